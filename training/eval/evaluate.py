"""`m2 eval`: a checkpoint against the validation split, beside the plain baselines.

    m2 eval --checkpoint runs/m2-tiny/final --data data/prepared --out runs/eval

Writes `report.json` (the keys of DESIGN section 11 and more), `report.md` (the same as
tables) and `pose_future_original.gif` / `pose_future_predicted.gif` (a few validation
clips side by side: the skeleton now, then six future skeletons, over the decoded frame).

Protocols (all on a fixed, seeded subset of the split):
- `ce`: per modality, the model sees every token of the other current modalities
  (tok_rgb, coords, captions minus the target) and predicts all tokens of the target
  (captions teacher-forced). `masked_ce` is the training-style number (Dirichlet masks
  with a fixed seed), comparable with the validation CE logged during training.
- `coords`: generated from the frame alone. `coords_next`, `tok_rgb_next`: generated from
  the frame and the true skeleton at t (the same information the baselines get).
  `coords_next_from_frame`: the future generated from the frame alone, as `/predict` does
  (the model reads the skeleton first), beside holding that read skeleton still, and the
  next key frame made alongside it (`tok_rgb_next.from_frame`).
  `captions`: teacher-forced token accuracy; BLEU and "names the action" on captions
  generated from the frame and the true skeleton. Generation is greedy (temperature 0).
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from m2core.modalities import TOKENS_PER_POSE
from m2core.model import PRESENT_OF
from m2core.tokenizers.image import atomic_write
from training.data.shards import MaskedDataset, Shards, load_meta
from training.eval import metrics as M
from training.eval.report import markdown
from training.eval.steering import steering_at_switches

log = logging.getLogger(__name__)
IGNORE = -100
NOW = ("tok_rgb", "coords", "captions", "action")


def full_batch(
    rows: dict[str, torch.Tensor], names: tuple[str, ...], inputs: list[str], target: str
) -> dict[str, torch.Tensor]:
    """The model's batch format with every token of `inputs` in, every token of `target` out."""
    B = rows["tok_rgb"].shape[0]

    def slots(name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = rows[name]
        pos = torch.arange(x.shape[1]).expand(B, -1)
        valid = torch.ones_like(x, dtype=torch.bool)
        if name == "captions":  # bos is implied; pad is absent
            valid = (x != 0) & (pos > 0)
        return x, pos, valid

    enc = [slots(n) for n in inputs]
    ids, pos, valid = (torch.cat(t, 1) for t in zip(*enc, strict=True))
    mod = torch.cat([torch.full_like(slots(n)[0], names.index(n)) for n in inputs], 1)
    x, tpos, tvalid = slots(target)
    if target == "captions":
        query = torch.roll(x, 1, 1)  # teacher forcing: query i carries token i-1
        labels = torch.where(tvalid, x, IGNORE)
    else:
        query, labels = torch.full_like(x, -1), x.clone()
    prior = torch.full_like(x, -1)
    present = PRESENT_OF.get(target)
    if present is not None and present in rows:  # the present token at each future position
        now = rows[present]
        prior = now.repeat(1, x.shape[1] // now.shape[1])
    return {
        "enc_ids": ids, "enc_mod": mod, "enc_pos": pos, "enc_valid": valid,
        "dec_query": query, "dec_mod": torch.full_like(x, names.index(target)), "dec_pos": tpos,
        "dec_valid": tvalid, "dec_labels": labels, "dec_prior": prior,
        "present_pose": rows["coords"] if "coords" in rows
        else torch.full((len(x), TOKENS_PER_POSE), -1, dtype=torch.long),
        **({"action": rows["action"].reshape(-1)} if "action" in rows else {}),
    }  # fmt: skip


def _ce_and_acc(model, batch) -> tuple[float, int, int]:
    if hasattr(model, "adapters"):  # format 2: each adapter's own loss, and its read-out
        total, n, ids, y = _adapter_scores(model, batch)
        return float(total), int(n), int(((ids == y) & (y >= 0)).sum())
    logits, _ = model(batch)
    (name,) = logits
    y = batch["dec_labels"].flatten()[(batch["dec_valid"]).flatten()]
    keep = y != IGNORE
    lg = logits[name][keep]
    y = y[keep]
    ce = torch.nn.functional.cross_entropy(lg.float(), y, reduction="sum")
    return float(ce), int(y.numel()), int((lg.argmax(-1) == y).sum())


def _adapter_scores(model, batch):
    """Format 2, a `full_batch`: the target adapter's (summed loss, count, read-out ids, labels)."""
    h, ctx = model.hidden(batch)
    name = model.names[int(batch["dec_mod"][0, 0])]
    sel, s = model.target_slots(batch, name)
    y = batch["dec_labels"].flatten()[sel]
    total, n = model.adapters[name].loss(h[sel], s, y, ctx)
    return total, n, model.adapters[name].readout(h[sel], s, ctx)[0], y


def choose_rows(n: int, samples: int, seed: int) -> np.ndarray:
    return np.sort(np.random.default_rng(seed).permutation(n)[: min(samples, n)])


def evaluate(
    checkpoint: str | Path, data: str | Path, out: str | Path, split: str = "val", samples: int = 256,
    batch_size: int = 16, gifs: int = 4, maskgit_steps: int = 8, seed: int = 0,
) -> dict[str, Any]:  # fmt: skip
    """Run every metric; write report.json, report.md and the GIF pair into `out`."""
    from m2core.checkpoint import load_checkpoint
    from m2core.generate import GenerationConfig, generate
    from m2core.masking import MaskingConfig, collate, mask_sample
    from m2core.tokenizers.pose import PoseTokenizer
    from training.losses import modality_ce

    meta = load_meta(data)
    shards = Shards(data, split, meta)
    if len(shards) == 0:
        raise ValueError(f"{data}: split {split!r} has no samples")
    bundle = load_checkpoint(checkpoint)
    model = bundle.model.eval()
    mc = model.config
    v2 = hasattr(model, "adapters")
    if v2:
        from m2core.chain import generate
    for key in ("image_vocab", "text_vocab", "caption_len"):
        if getattr(mc, key) != meta[key]:
            raise ValueError(
                f"checkpoint {checkpoint} has {key}={getattr(mc, key)} but {data} has {meta[key]}: different tokenizers"
            )
    text_tok = bundle.text_tokenizer
    if text_tok is not None and text_tok.sha256 != meta.get("tokenizers", {}).get(
        "text_sha256", text_tok.sha256
    ):
        raise ValueError(f"checkpoint {checkpoint} and {data} use different text tokenizers")
    pose = PoseTokenizer()
    rows = choose_rows(len(shards), samples, seed)
    names = model.names
    A = shards.arrays
    offsets = meta.get("future_offsets", list(range(1, 7)))
    ce_sum = {n: [0.0, 0, 0] for n in names}
    masked: dict[str, list[float]] = {}
    mcfg = MaskingConfig(mc.input_tokens, mc.target_tokens)
    mdata = MaskedDataset(shards, lambda s, g: mask_sample(s, mcfg, g), seed + 1)
    gen_cfg = GenerationConfig(maskgit_steps=maskgit_steps, temperature=0.0, seed=seed)
    pred_now, pred_next, pred_rgb, captions, frame_captions = [], [], [], [], []
    steer: dict[str, list] = {"true": [], "wrong": []}
    wrong_actions: list[np.ndarray] = []
    actions: dict[str, list] = {"from_frame": [], "given_skeleton": [], "skeleton_alone": []}
    conf_now: list[np.ndarray] = []
    wgen = torch.Generator().manual_seed(seed)
    frame_next, frame_rgb = [], []
    heat = v2 and mc.read_heat
    heat_now: list[np.ndarray] = []  # the heat map's read alone (model.read_heat)
    with torch.no_grad():
        for i in tqdm(range(0, len(rows), batch_size), desc="eval", unit="batch"):
            r = rows[i : i + batch_size]
            full = shards.modalities(r)
            truth_action = torch.as_tensor(np.asarray(A["action"][r], np.int64))
            if v2:
                full["action"] = truth_action[:, None]
            for target in names:
                ins = [n for n in NOW if n != target and n in names]
                ce, n, ok = _ce_and_acc(model, full_batch(full, names, ins, target))
                s = ce_sum[target]
                s[0], s[1], s[2] = s[0] + ce, s[1] + n, s[2] + ok
            mb = collate([mdata[int(p)] for p in range(i, i + len(r))])
            parts = model(mb)[0] if v2 else modality_ce(model(mb)[0], mb, names)
            for name, (ce, k) in parts.items():
                acc_ = masked.setdefault(name, [0.0, 0])
                acc_[0], acc_[1] = acc_[0] + float(ce), acc_[1] + int(k)
            a = generate(model, {"tok_rgb": full["tok_rgb"]}, gen_cfg)  # what /predict does
            b = generate(model, {"tok_rgb": full["tok_rgb"], "coords": full["coords"]}, gen_cfg)
            pred_now.append(a.coords.numpy())
            frame_next.append(a.coords_next[:, 0].numpy())
            frame_rgb.append(a.tok_rgb_next[:, 0].numpy())
            pred_next.append(b.coords_next[:, 0].numpy())
            pred_rgb.append(b.tok_rgb_next[:, 0].numpy())
            captions += b.captions
            frame_captions += a.captions
            if v2:  # the label read-out, steering by action, and per-joint confidence
                C = model.config.action_classes
                wrong = (
                    truth_action + 1 + torch.randint(0, C - 1, truth_action.shape, generator=wgen)
                ) % C
                wrong_actions.append(wrong.numpy())
                for key, act in (("true", truth_action), ("wrong", wrong)):
                    g = generate(
                        model,
                        {"tok_rgb": full["tok_rgb"], "coords": full["coords"], "action": act},
                        gen_cfg,
                    )
                    steer[key].append(g.coords_next[:, 0].numpy())
                actions["from_frame"].append(a.action.numpy())
                actions["given_skeleton"].append(b.action.numpy())
                # does the action read the skeleton at all? (its shape names the action)
                alone = _adapter_scores(model, full_batch(full, names, ["coords"], "action"))[2]
                actions["skeleton_alone"].append(alone.numpy())
                if heat:
                    emb = model.frame_embedding(full["tok_rgb"])
                    heat_now.append(model.adapters["coords"].heat_read(emb)[0].numpy())
                conf = a.confidence["coords"].view(-1, 13, 3)
                conf_now.append((conf[..., 0] * conf[..., 1]).numpy())

    gt_now = pose.decode(np.asarray(A["coords"][rows], np.int64))
    gt_next = pose.decode_future(np.asarray(A["coords_next"][rows], np.int64))
    gt_prev = pose.decode(np.asarray(A["coords_prev"][rows], np.int64))
    scale = M.person_scale(np.asarray(A["bbox"][rows]))
    p_next = pose.decode_future(np.concatenate(pred_next), strict=False)
    p_now = pose.decode(np.concatenate(pred_now), strict=False)
    err_now = M.normalised_errors(p_now[..., :2], gt_now[..., :2], scale)
    ce = {n: s[0] / s[1] for n, s in ce_sum.items() if s[1]}
    ce["mean"] = float(np.mean(list(ce.values())))
    mce = {n: s[0] / s[1] for n, s in masked.items() if s[1]}
    mce["mean"] = float(np.mean(list(mce.values()))) if mce else float("nan")
    report: dict[str, Any] = {
        "samples": len(rows), "clips": len(set(np.asarray(A["clip"][rows]).tolist())), "split": split,
        "checkpoint": str(checkpoint), "version": getattr(bundle, "version", None),
        "ce": ce, "masked_ce": mce,
        "coords_next": {**M.forecast_metrics(p_next, gt_next, scale),
                        "zero_velocity": M.forecast_metrics(M.zero_velocity(gt_now, 6), gt_next, scale),
                        "constant_velocity": M.forecast_metrics(M.constant_velocity(gt_now, gt_prev, offsets), gt_next, scale)},
        "coords": {"pck@0.05": M.pck(err_now, gt_now[..., 2] > 0.5),
                   "pck@0.05_by_group": M.pck_by_group(err_now, gt_now[..., 2] > 0.5),
                   "flag_accuracy": float(((p_now[..., 2] > 0.5) == (gt_now[..., 2] > 0.5)).mean()),
                   "flag_all_visible": float((gt_now[..., 2] > 0.5).mean())},
        "coords_next_from_frame": {
            **M.forecast_metrics(pose.decode_future(np.concatenate(frame_next), strict=False), gt_next, scale),
            "zero_velocity": M.forecast_metrics(M.zero_velocity(p_now, 6), gt_next, scale)},
    }  # fmt: skip
    if heat_now:  # what the stem's heat map reads alone, beside the trunk's read-out above
        err = M.normalised_errors(np.concatenate(heat_now), gt_now[..., :2], scale)
        report["coords"]["heat_alone_pck@0.05"] = M.pck(err, gt_now[..., 2] > 0.5)
        report["coords"]["heat_alone_pck@0.05_by_group"] = M.pck_by_group(err, gt_now[..., 2] > 0.5)
    if v2:
        truth_a = np.asarray(A["action"][rows], np.int64)
        report["action"] = {
            k: float((np.concatenate(v) == truth_a).mean()) for k, v in actions.items()
        }
        steered = {k: pose.decode_future(np.concatenate(v), strict=False) for k, v in steer.items()}
        report["steering"] = {"no_action": report["coords_next"]["ade"], **{
            f"{k}_action": M.forecast_metrics(v, gt_next, scale)["ade"] for k, v in steered.items()}}  # fmt: skip
        sw = steering_at_switches(model, shards, pose, gen_cfg, samples, batch_size, seed)
        if sw:  # clips that change action: where a label can say what the pose does not
            report["steering"]["at_switches"] = sw
        report["coords"]["confidence"] = _reliability(
            np.concatenate(conf_now), err_now < 0.05, gt_now[..., 2] > 0.5
        )
    report["tok_rgb_next"] = _image_metrics(
        bundle, np.concatenate(pred_rgb), A, rows, batch_size, np.concatenate(frame_rgb)
    )
    report["captions"] = _caption_metrics(text_tok, captions, A, rows, meta, ce_sum["captions"])
    if text_tok is not None and meta.get("actions"):  # what /predict does: the frame alone
        texts = [text_tok.decode(np.asarray(c, np.int64)) for c in frame_captions]

        def share_naming(ids) -> float:
            names = [meta["actions"][int(a)] for a in ids]
            return float(np.mean([M.names_action(t, a) for t, a in zip(texts, names, strict=True)]))

        report["captions"]["action_accuracy_from_frame"] = share_naming(A["action"][rows])
        if v2:  # the chain captions after reading the action: does the caption follow it?
            report["captions"]["names_read_action_from_frame"] = share_naming(
                np.concatenate(actions["from_frame"])
            )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(report, indent=1, default=_nan_none) + "\n"
    atomic_write(out / "report.json", lambda tmp: Path(tmp).write_text(text))
    atomic_write(out / "report.md", lambda tmp: Path(tmp).write_text(markdown(report)))
    if gifs:
        from training.eval.gifs import write_gif_pair, write_steering_gif

        write_gif_pair(out, bundle.image_tokenizer, A, rows, gt_now, gt_next, p_next, gifs)
        if v2 and meta.get("actions"):  # two samples: each is two panels wide
            names = meta["actions"]
            write_steering_gif(
                out, bundle.image_tokenizer, A, rows, gt_now, (steered["true"], steered["wrong"]),
                ([names[int(a)] for a in A["action"][rows]],
                 [names[int(a)] for a in np.concatenate(wrong_actions)]), min(gifs, 2))  # fmt: skip
    return report


def _image_metrics(
    bundle, pred: np.ndarray, A, rows, batch: int, from_frame: np.ndarray
) -> dict[str, Any]:
    """Token accuracy and PSNR of the next key frame given the true skeleton (`pred`), from
    the frame alone (`from_frame`, what /predict makes) and of copying the present frame."""
    truth = np.asarray(A["tok_rgb_next"][rows], np.int64)
    now = np.asarray(A["tok_rgb"][rows], np.int64)
    res: dict[str, Any] = {"token_accuracy": M.token_accuracy(pred, truth),
                           "from_frame": {"token_accuracy": M.token_accuracy(from_frame, truth)},
                           "copy_current": {"token_accuracy": M.token_accuracy(now, truth)}}  # fmt: skip
    tok = bundle.image_tokenizer
    if tok is not None:
        from m2core.tokenizers.image import psnr

        def dec(x: np.ndarray) -> np.ndarray:
            return np.concatenate(
                [
                    tok.decode(x[i : i + batch].reshape(-1, 16, 16)).numpy()
                    for i in range(0, len(x), batch)
                ]
            )

        ref = dec(truth)
        res["psnr"] = float(psnr(dec(pred), ref).mean())
        res["copy_current"]["psnr"] = float(psnr(dec(now), ref).mean())
        res["from_frame"]["psnr"] = float(psnr(dec(from_frame), ref).mean())
        res["psnr_reference"] = "decoded ground-truth tokens of frame t+S"
    return res


def _caption_metrics(
    text_tok, generated: list[list[int]], A, rows, meta, tf: list
) -> dict[str, Any]:
    res: dict[str, Any] = {"token_accuracy": tf[2] / tf[1] if tf[1] else float("nan")}
    if text_tok is None:
        return res
    truth = [text_tok.decode(np.asarray(c, np.int64)) for c in A["captions"][rows]]
    hyps = [text_tok.decode(np.asarray(c, np.int64)) for c in generated]
    actions = [meta["actions"][int(a)] for a in A["action"][rows]] if meta.get("actions") else []
    res["bleu"] = M.bleu(truth, hyps)
    if actions:
        res["action_accuracy"] = float(
            np.mean([M.names_action(h, a) for h, a in zip(hyps, actions, strict=True)])
        )
        res["action_accuracy_reference"] = float(
            np.mean([M.names_action(t, a) for t, a in zip(truth, actions, strict=True)])
        )
    res["examples"] = [
        {"reference": t, "generated": h} for t, h in list(zip(truth, hyps, strict=True))[:5]
    ]
    return res


def _reliability(
    conf: np.ndarray, hit: np.ndarray, visible: np.ndarray, bins: int = 5
) -> dict[str, Any]:
    """Per-joint confidence vs "within PCK@0.05" over the visible joints: a reliability
    table (confidence bins -> share within) and the AUROC of confidence for that event."""
    c, y = conf[visible].astype(np.float64), hit[visible].astype(bool)
    edges = np.linspace(0, 1, bins + 1)
    table = []
    for lo, hi in itertools.pairwise(edges):
        inside = (c >= lo) & ((c < hi) | (hi == 1.0))
        table.append({"confidence": f"{lo:.1f}-{hi:.1f}", "joints": int(inside.sum()),
                      "within": float(y[inside].mean()) if inside.any() else float("nan"),
                      "mean_confidence": float(c[inside].mean()) if inside.any() else float("nan")})  # fmt: skip
    pos, neg = c[y], c[~y]
    if len(pos) and len(neg):  # Mann-Whitney U: P(a hit's confidence > a miss's)
        ranks = (
            np.argsort(np.argsort(np.concatenate([pos, neg]), kind="stable"), kind="stable") + 1.0
        )
        auroc = float(
            (ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg))
        )
    else:
        auroc = float("nan")
    return {"auroc": auroc, "table": table}


def _nan_none(x: Any) -> Any:
    return None if isinstance(x, float) and x != x else str(x)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="m2 eval", description="Evaluate a checkpoint against baselines."
    )
    p.add_argument("--checkpoint", required=True, type=Path, help="serving checkpoint directory")
    p.add_argument("--data", required=True, type=Path, help="folder written by m2 prepare")
    p.add_argument(
        "--out", required=True, type=Path, help="where report.json / report.md / GIFs go"
    )
    p.add_argument("--split", default="val", choices=("train", "val", "test"))
    p.add_argument("--samples", type=int, default=256, help="samples evaluated (seeded subset)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--gifs", type=int, default=4, help="clips shown in the GIF pair (0 = none)")
    p.add_argument("--maskgit-steps", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.samples < 1 or a.batch_size < 1 or a.gifs < 0 or a.maskgit_steps < 1:
        print(
            "m2 eval: error: --samples, --batch-size, --maskgit-steps must be >= 1, --gifs >= 0",
            file=sys.stderr,
        )
        return 2
    try:
        r = evaluate(a.checkpoint, a.data, a.out, a.split, a.samples, a.batch_size, a.gifs,
                     a.maskgit_steps, a.seed)  # fmt: skip
    except (ValueError, FileNotFoundError) as e:
        print(f"m2 eval: error: {e}", file=sys.stderr)
        return 2
    print(markdown(r))
    print(f"wrote {a.out / 'report.json'}")
    return 0
