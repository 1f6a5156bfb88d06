"""`report.md`: the tables of an `m2 eval` report (report.json) in markdown."""

from __future__ import annotations

from typing import Any


def _f(x: Any, digits: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and x != x) else f"{x:.{digits}f}"


def _pose_table(rows: list[tuple[str, dict[str, Any]]]) -> list[str]:
    """Markdown lines: PCK@0.05 per future step, ADE and FDE, one row per (label, metrics)."""
    steps = len(rows[0][1]["pck@0.05"])
    head = (
        "| method | " + " | ".join(f"PCK@0.05 t+{i + 1}" for i in range(steps)) + " | ADE | FDE |"
    )
    lines = [head, "|---" * (steps + 3) + "|"]
    for label, m in rows:
        pck = " | ".join(_f(x) for x in m["pck@0.05"])
        lines.append(f"| {label} | {pck} | {_f(m['ade'])} | {_f(m['fde'])} |")
    return lines


def _group_table(rows: list[tuple[str, dict[str, Any]]]) -> list[str]:
    """Markdown lines: forecast ADE per joint group, one row per (label, metrics); none for
    reports written before the groups were."""
    rows = [(label, m["ade_by_group"]) for label, m in rows if "ade_by_group" in m]
    if not rows:
        return []
    groups = list(rows[0][1])
    lines = [
        "| ADE by joint group | " + " | ".join(groups) + " |",
        "|---" * (len(groups) + 1) + "|",
    ]
    lines += [f"| {label} | " + " | ".join(_f(m[g]) for g in groups) + " |" for label, m in rows]
    return [*lines, ""]


def markdown(r: dict[str, Any]) -> str:
    cn = r["coords_next"]
    lines = [f"# M2 evaluation: {r['samples']} samples from {r['clips']} clips ({r['split']} split)", "",
             "## Cross-entropy per modality", "", "| modality | CE (all other current modalities in) | masked CE |", "|---|---|---|"]  # fmt: skip
    for k, v in r["ce"].items():
        lines.append(f"| {k} | {_f(v)} | {_f(r['masked_ce'].get(k))} |")
    lines += ["", "## Future skeletons (`coords_next`)", ""]
    lines += _pose_table([("M2", cn), ("zero velocity", cn["zero_velocity"]),
                          ("constant velocity", cn["constant_velocity"])])  # fmt: skip
    t, c = r["tok_rgb_next"], r["captions"]
    lines += ["", *_group_table([("M2", cn), ("zero velocity", cn["zero_velocity"])])]
    lines += ["Given the frame and the true skeleton at t. ADE / FDE in person scales (longer side "
              "of the box at t); invisible joints excluded.", "",
              f"Skeleton now from the frame alone: PCK@0.05 {_f(r['coords']['pck@0.05'])}"
              + (f"; visibility flags right for {_f(r['coords']['flag_accuracy'])} of the joints (marking "
                 f"every joint visible: {_f(r['coords']['flag_all_visible'])})" if "flag_accuracy" in r["coords"] else ""),
              ""]  # fmt: skip
    groups = r["coords"].get("pck@0.05_by_group")
    if groups:
        lines += ["| joint group | " + " | ".join(groups) + " |", "|---" * (len(groups) + 1) + "|",
                  "| PCK@0.05 from the frame | " + " | ".join(_f(v) for v in groups.values()) + " |"]  # fmt: skip
        heat = r["coords"].get("heat_alone_pck@0.05_by_group")
        if heat:
            lines += [f"| the heat map alone ({_f(r['coords']['heat_alone_pck@0.05'])} in all) | "
                      + " | ".join(_f(heat[g]) for g in groups) + " |"]  # fmt: skip
        lines += [""]
    conf = r["coords"].get("confidence")
    if conf:
        lines += [f"Per-joint confidence (the skeleton read from the frame): AUROC {_f(conf['auroc'])} for "
                  "\"within PCK@0.05\".", "", "| confidence | joints | mean confidence | share within |",
                  "|---|---|---|---|"]  # fmt: skip
        lines += [f"| {b['confidence']} | {b['joints']} | {_f(b['mean_confidence'])} | {_f(b['within'])} |"
                  for b in conf["table"]]  # fmt: skip
        lines.append("")
    if "action" in r:
        a, st = r["action"], r["steering"]
        lines += ["## Action (`action` label)", "", "| from the frame alone | given the true skeleton | the true skeleton alone, no frame |",
                  "|---|---|---|", f"| {_f(a['from_frame'])} | {_f(a['given_skeleton'])} | {_f(a.get('skeleton_alone'))} |", "",
                  "Steering: forecast ADE given the frame and the true skeleton, with no action, the true "
                  "action and a wrong one as input.", "", "| no action | true action | wrong action |", "|---|---|---|",
                  f"| {_f(st['no_action'])} | {_f(st['true_action'])} | {_f(st['wrong_action'])} |", ""]  # fmt: skip
        sw = st.get("at_switches")
        if sw:
            lines += [f"At the {sw['samples']} samples ({sw['clips']} clips) whose label leads the motion (it differs "
                      "from the clip's label a horizon earlier, which the pose still shows):", "",
                      "| no action | coming (true) action | shown (earlier) action | zero velocity |", "|---|---|---|---|",
                      f"| {_f(sw['no_action'])} | {_f(sw['true_action'])} | {_f(sw['shown_action'])} | {_f(sw['zero_velocity'])} |", ""]  # fmt: skip
    ff = r.get("coords_next_from_frame")
    if ff:  # reports written before this section existed lack it
        lines += ["## Future skeletons from the frame alone (what `/predict` does)", ""]
        lines += _pose_table(
            [("M2", ff), ("zero velocity (the skeleton M2 read)", ff["zero_velocity"])]
        )
        lines += [
            "",
            *_group_table([("M2", ff), ("holding the read skeleton still", ff["zero_velocity"])]),
        ]
        lines += ["M2 reads the skeleton from the frame, then forecasts from it; errors against the "
                  "true future skeletons.", ""]  # fmt: skip
    lines += [
              "## Next key frame (`tok_rgb_next`)", "", "| method | token accuracy | PSNR (dB) |", "|---|---|---|",
              f"| M2 | {_f(t['token_accuracy'], 4)} | {_f(t.get('psnr'))} |",
              *([f"| M2 from the frame alone (what `/predict` does) | {_f(t['from_frame']['token_accuracy'], 4)} | "
                 f"{_f(t['from_frame'].get('psnr'))} |"] if "from_frame" in t else []),
              f"| copy current frame | {_f(t['copy_current']['token_accuracy'], 4)} | {_f(t['copy_current'].get('psnr'))} |",
              "", "## Captions", "", "| token accuracy (teacher-forced) | names the action | names it from the frame alone | BLEU-4 |", "|---|---|---|---|",
              f"| {_f(c['token_accuracy'])} | {_f(c.get('action_accuracy'))} | {_f(c.get('action_accuracy_from_frame'))} | {_f(c.get('bleu'))} |", "",
              "Names the action: the caption made from the frame and the true skeleton. From the frame alone: "
              "the model reads the skeleton first, as `/predict` does.", "",
              *([f"From the frame alone, the caption names the action the model read out for "
                 f"{_f(c['names_read_action_from_frame'])} of the frames.", ""]
                if "names_read_action_from_frame" in c else [])]  # fmt: skip
    return "\n".join(lines)
