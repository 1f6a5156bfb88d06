"""Write a serving checkpoint's MODEL_CARD.md from what its commands measured.

    python scripts/model_card.py --checkpoint checkpoints/m2-demo --work data/demo

Reads (all written by the repo's own commands, see scripts/make_demo.sh):
`WORK/eval/report.json` (m2 eval on the held-out test clips), `WORK/tokenizer/metrics.json`
(m2 train-tokenizer), `WORK/run/logs/metrics.jsonl` (training; `WORK/finetune/logs/`,
`WORK/finetune2/logs/` for the fine-tune stages, with `--earlier` the checkpoints each stage
served), `WORK/prepared/meta.json`
(m2 prepare), `WORK/times.json` (stage wall times, written by make_demo.sh) and the
checkpoint's `reproduce.json` (the small held-out set the tests re-evaluate).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path
from typing import Any

import yaml

from training.eval.report import markdown


def _read(path: Path) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing")
    return json.loads(path.read_text())


def _last(rows: list[dict], key: str) -> Any:
    return next((r[key] for r in reversed(rows) if key in r), None)


def _gain_table(cn: dict) -> str:
    """Per future step: M2's PCK beside zero velocity, and ADE's reduction."""
    zv = cn["zero_velocity"]
    head = "| | " + " | ".join(f"t+{i + 1}" for i in range(len(cn["pck@0.05"]))) + " |"
    rows = [
        head,
        "|---" * (len(cn["pck@0.05"]) + 1) + "|",
        "| PCK@0.05 M2 | " + " | ".join(f"{x:.3f}" for x in cn["pck@0.05"]) + " |",
        "| PCK@0.05 zero velocity | " + " | ".join(f"{x:.3f}" for x in zv["pck@0.05"]) + " |",
    ]
    if "per_step" in cn and "per_step" in zv:
        rows.append(
            "| mean error M2 / zero velocity | "
            + " | ".join(
                f"{a:.4f} / {b:.4f}" for a, b in zip(cn["per_step"], zv["per_step"], strict=True)
            )
            + " |"
        )
    return "\n".join(rows)


def train_command(tcfg: dict) -> str:
    """The accelerate command line that the run's stored config corresponds to."""
    if tcfg.get("cpu", True):
        return ("accelerate launch --cpu --num_processes 1 training/train.py --config configs/m2-tiny.yaml \\\n"
                "    data_dir=data/demo/prepared output_dir=data/demo/run")  # fmt: skip
    keys = ("cpu", "dtype", "tf32", "num_workers", "batch_size", "lr", "total_tokens", "warmup_tokens",
            "eval_interval", "eval_samples")  # fmt: skip

    def show(v: object) -> str:
        return (
            str(v).lower()
            if isinstance(v, bool)
            else f"{v:.6g}"
            if isinstance(v, float)
            else str(v)
        )

    args = " ".join(f"{k}={show(tcfg[k])}" for k in keys if k in tcfg)
    # a time-budgeted run stores the token counts it re-planned to: they give the same
    # schedule on any machine, however fast
    budget = (f"  # as run: time_budget={tcfg['time_budget']} chose these token counts\n"
              if tcfg.get("time_budget") else "")  # fmt: skip
    return (f"{budget}accelerate launch --num_processes 1 --mixed_precision bf16 training/train.py \\\n"
            f"    --config configs/m2-tiny.yaml data_dir=data/demo/prepared output_dir=data/demo/run \\\n    {args}")  # fmt: skip


# The fine-tune stages of scripts/make_demo.sh after the first training stage, in order:
# (config, WORK folder, the metric `m2 export --best` picks the served step by).
FINETUNES: tuple[tuple[str, str, str], ...] = (
    ("configs/m2-tiny-finetune.yaml", "finetune", "val/ce_coords_next"),
    ("configs/m2-tiny-finetune-context.yaml", "finetune2", "val/ce_mean"),
)


def finetune_command(tcfg: dict, k: int) -> str:
    """Fine-tune stage k's (0 = the second stage) command line, from the previous weights."""
    config, folder, metric = FINETUNES[k]
    start = "data/demo/run/final" if k == 0 else f"data/demo/{FINETUNES[k - 1][1]}/best"
    budget = (f"  # as run: time_budget={tcfg['time_budget']} chose total_tokens={tcfg['total_tokens']:.6g}\n"
              if tcfg.get("time_budget") else "")  # fmt: skip
    return (f"{budget}accelerate launch --cpu --num_processes 1 training/train.py --config {config} \\\n"
            f"    init_from={start} data_dir=data/demo/prepared output_dir=data/demo/{folder} \\\n"
            f"    total_tokens={tcfg['total_tokens']:.6g} warmup_tokens={tcfg['warmup_tokens']:.6g}\n"
            f"m2 export --from data/demo/{folder} --best {metric} --out data/demo/{folder}/best")  # fmt: skip


def _training_line(label: str, rows: list[dict], tcfg: dict) -> str:
    return (f"{label}{_last(rows, 'tokens') / 1e6:.1f}M tokens ({_last(rows, 'step')} steps of {tcfg['batch_size']} samples "
            f"x {tcfg['num_tokens_per_sample']} tokens), final training loss {_last(rows, 'train/loss'):.3f}, "
            f"validation CE (masked, mean) {_last(rows, 'val/ce_mean') or float('nan'):.3f}.")  # fmt: skip


def _from_frame(report: dict) -> str:
    """The forecast from the frame alone, for reports that have it."""
    ff = report.get("coords_next_from_frame")
    if not ff:
        return ""
    return (f"\nfrom the frame alone ADE {ff['ade']:.4f} (holding the read skeleton still "
            f"{ff['zero_velocity']['ade']:.4f}),")  # fmt: skip


def card(ckpt: Path, work: Path, history: str = "", earlier: list[Path] | None = None) -> str:
    """`earlier`: the serving checkpoints of the stages before the last (WORK/run/final,
    then WORK/finetune/best, ...); none = one training stage."""
    report = _read(work / "eval" / "report.json")
    tok = _read(work / "tokenizer" / "metrics.json")["held_out"]
    meta = _read(work / "prepared" / "meta.json")
    times = _read(work / "times.json")
    repro = _read(ckpt / "reproduce.json")
    config = _read(ckpt / "config.json")

    def log_rows(run: str) -> list[dict]:
        return [json.loads(x) for x in (work / run / "logs" / "metrics.jsonl").read_text().splitlines() if x.strip()]  # fmt: skip

    earlier = list(earlier or [])
    if len(earlier) > len(FINETUNES):
        raise KeyError(f"{len(earlier) + 1} stages, but model_card knows {len(FINETUNES) + 1}")
    cn, zv = report["coords_next"], report["coords_next"]["zero_velocity"]
    size = sum(p.stat().st_size for p in ckpt.rglob("*") if p.is_file())
    counts = ", ".join(f"{s} {c['samples']} samples / {c['clips']} clips" for s, c in meta["counts"].items())  # fmt: skip
    tcfg = config.get("extra", {}).get("training", {}).get("config", {})
    # each stage's training config: the earlier checkpoints', then the served one's
    cfgs = [_read(e / "config.json")["extra"]["training"]["config"] for e in earlier] + [tcfg]
    train_cmd = "\n".join(
        [train_command(cfgs[0])] + [finetune_command(c, k) for k, c in enumerate(cfgs[1:])]
    )
    training = _training_line("Stage 1: " if earlier else "Training: ", log_rows("run"), cfgs[0])
    for k, c in enumerate(cfgs[1:]):
        folder, metric = FINETUNES[k][1], FINETUNES[k][2]
        ck = config if k == len(earlier) - 1 else _read(earlier[k + 1] / "config.json")
        training += ("\n" + _training_line(f"Stage {k + 2} (fine-tune): ", log_rows(folder), c)
                     + f" Its served weights are step {ck['extra']['training']['run']['steps']}, the kept"
                     f" checkpoint with the lowest `{metric}` (`m2 export --best`).")  # fmt: skip
    last = f"{FINETUNES[len(earlier) - 1][1]}/best" if earlier else "run/final"
    image = config.get("extra", {}).get("image_context")
    if image:  # fitted last, on the served transformer (`m2 fit-image-context`)
        train_cmd += (f"\nm2 fit-image-context data/demo/{last} --data data/demo/prepared "
                      f"--out data/demo/image_context --steps {image['steps']}")  # fmt: skip
        last = "image_context"
        training += (f"\nLast, the image context (captions from the frame alone): {image['steps']} steps of "
                     f"{image['batch_size']} training frames in {image['seconds'] / 60:.1f} min; the action head on "
                     f"it names the action of {100 * image['val_accuracy']:.1f}% of validation frames (window on "
                     "the true skeleton). The transformer's weights are those of the stage before.")  # fmt: skip
    motion = config.get("extra", {}).get("motion")
    # a motion fit that reads skeletons from the frame needs the pose reader: it came after
    passes = [*motion.get("earlier", []), motion] if motion else []
    for r in [r for r in passes if not r.get("read_share")]:  # fitted on true skeletons
        train_cmd += (f"\nm2 fit-motion data/demo/{last} --data data/demo/prepared "
                      f"--out data/demo/motion --steps {r['steps']}")  # fmt: skip
        last = "motion"
        gain = 1 - r["val_distance"] / r["val_zero_velocity"]
        training += (f"\nThen the motion head (the forecast from the skeleton's shape): {r['steps']} steps of "
                     f"{r['batch_size']} training skeletons in {r['seconds'] / 60:.1f} min; alone, its "
                     f"forecast of validation skeletons is {100 * gain:.1f}% closer than zero velocity (mean joint "
                     f"distance {r['val_distance']:.4f} vs {r['val_zero_velocity']:.4f} skeleton extents). "
                     "The transformer's weights are those of the stage before.")  # fmt: skip
    reader = config.get("extra", {}).get("pose_reader")
    if reader:  # fitted last (`m2 fit-pose-reader`), in one or more passes
        passes_r = [*reader.get("earlier", []), reader]
        for k, r in enumerate(passes_r):
            out = "pose_reader" + (str(k + 1) if k else "")
            seed = f" --seed {r['seed']}" if r["seed"] else ""
            # passes fitted before the shift augmentation existed ran without it
            seed += "" if r.get("shift", 0) == 2 else f" --shift {r.get('shift', 0)}"
            train_cmd += (f"\nm2 fit-pose-reader data/demo/{last} --data data/demo/prepared "
                          f"--out data/demo/{out} --steps {r['steps']}{seed}")  # fmt: skip
            last = out
        minutes = sum(r["seconds"] for r in passes_r) / 60
        training += (f"\nThen the pose reader (the skeleton from the frame): {len(passes_r)} pass(es) of "
                     f"{' + '.join(str(r['steps']) for r in passes_r)} steps of {reader['batch_size']} training "
                     f"frames in {minutes:.1f} min; alone, it places {100 * reader['val_pck@0.05']:.1f}% of the "
                     "visible joints of validation frames within PCK@0.05. The transformer's weights are "
                     "those of the stage before.")  # fmt: skip
        flagged = [k for k, r in enumerate(passes_r) if "val_flag_accuracy" in r]
        if flagged:  # its flag head (visibility), added by the pass that first has a figure
            training += (f" Its flag head (each joint's visibility), added in pass {flagged[0] + 1}, marks "
                         f"{100 * reader['val_flag_accuracy']:.1f}% of the validation joints right "
                         f"(marking every joint visible: {100 * reader['val_flag_all_visible']:.1f}%).")  # fmt: skip
    for r in [r for r in passes if r.get("read_share")]:  # on skeletons read from the frame
        share = "" if r["read_share"] == 0.5 else f" --read-share {r['read_share']:g}"
        train_cmd += (f"\nm2 fit-motion data/demo/{last} --data data/demo/prepared "
                      f"--out data/demo/motion_read --steps {r['steps']}{share}")  # fmt: skip
        last = "motion_read"
        gain = 1 - r["val_distance"] / r["val_zero_velocity"]
        gain_read = 1 - r["val_read_distance"] / r["val_read_zero_velocity"]
        training += (f"\n{'Then' if config.get('extra', {}).get('next_frame') else 'Last,'} the motion head again, from where it was, with {100 * r['read_share']:.0f}% of each batch "
                     f"forecast from the skeleton the pose reader reads from the frame (as `/predict` does): "
                     f"{r['steps']} steps in {r['seconds'] / 60:.1f} min. On validation skeletons its forecast is "
                     f"{100 * gain:.1f}% closer than zero velocity from the true skeleton, and from the read one "
                     f"{100 * gain_read:.1f}% closer than holding it still ({r['val_read_distance']:.4f} vs "
                     f"{r['val_read_zero_velocity']:.4f} extents).")  # fmt: skip
    nf = config.get("extra", {}).get("next_frame")
    if nf:  # fitted last (`m2 fit-next-frame`)
        train_cmd += (f"\nm2 fit-next-frame data/demo/{last} --data data/demo/prepared "
                      f"--out data/demo/next_frame --steps {nf['steps']}")  # fmt: skip
        last = "next_frame"
        margin = ("no margin beat copying, so it copies the frame" if nf["margin"] is None
                  else f"it changes a token where its guess beats the present one by more than {nf['margin']:g} "
                  f"nat{'' if nf['margin'] == 1 else 's'} "
                  "(the most accurate margin on validation frames)")  # fmt: skip
        share = (
            f" ({100 * nf['read_share']:.0f}% of each batch with the skeleton the pose reader reads)"
            if nf.get("read_share")
            else ""
        )
        training += (f"\nLast, the next-frame head (the next key frame from the frame and the forecast): "
                     f"{nf['steps']} steps of {nf['batch_size']} training frames{share} in {nf['seconds'] / 60:.1f} min; "
                     f"{margin}. On validation frames it then changes {100 * nf['val_changed']:.2f}% of the tokens "
                     f"and gets {100 * nf['val_token_accuracy']:.2f}% right, against {100 * nf['val_copy_accuracy']:.2f}% "
                     f"for copying the frame (its most likely digits everywhere: {100 * nf['val_best_digits_accuracy']:.2f}%).")  # fmt: skip
        if "val_read_token_accuracy" in nf:  # its own margin for a skeleton read from the frame
            read = ("no margin beats copying, so it copies the frame" if nf["margin_read"] is None
                    else f"at its own margin of {nf['margin_read']:g} nat{'' if nf['margin_read'] == 1 else 's'} it changes "
                    f"{100 * nf['val_read_changed']:.2f}% of the tokens")  # fmt: skip
            training += (f" From the skeleton the pose reader reads (as `/predict` has it), {read}: "
                         f"{100 * nf['val_read_token_accuracy']:.2f}% right, against {100 * nf['val_read_copy_accuracy']:.2f}% "
                         "for copying.")  # fmt: skip
    stage = "\n".join(f"| {k} | {v / 60:.1f} min |" for k, v in times.items() if k != "machine")
    return f"""# M2 demo checkpoint (`m2-tiny`)

A 4M-style encoder-decoder ({config["weights"]["num_params"] / 1e6:.1f}M parameters, preset
`{config["model"]["preset"]}`) that, from one video frame, predicts the person's skeleton
now, a caption, the next six skeletons and the next key frame's image tokens. Trained only
on synthetic clips rendered by `m2 synth`; {size / 1e6:.1f} MB on disk (weights stored in
float16, loaded back to float32).

## How it was made

Every step is a command of this repo; `bash scripts/make_demo.sh` runs them all:

```
m2 synth --out data/demo/synth --clips 400 --seed 0 --workers 2
m2 train-tokenizer --data data/demo/synth --out data/demo/tokenizer --config configs/tokenizer.yaml steps=1500 levels=[8,8,8,8] limb_weight=0 max_train_frames=4000 time_budget=0 eval_every=250
m2 synth --out data/demo/synth --clips {meta["source"].get("synth", {}).get("clips", "?")} --seed 0 --workers 2 --resume
m2 prepare --data data/demo/synth --tokenizer data/demo/tokenizer --out data/demo/prepared --hop {meta.get("hop", meta["stride"])}
{train_cmd}
python scripts/pack_checkpoint.py data/demo/{last} checkpoints/m2-demo --dtype float16
m2 eval --checkpoint checkpoints/m2-demo --data data/demo/prepared --out data/demo/eval --split test --samples 256
```

Machine: {times.get("machine", platform.processor() or platform.machine())}.

| stage | wall time |
|---|---|
{stage}

Data: {meta["source"].get("synth", {}).get("clips", "?")} synthetic clips (10 actions), split by
clip: {counts}. Key-frame stride {meta["stride"]}, a key frame every {meta.get("hop", meta["stride"])} frames; captions from the synthetic side file;
caption vocabulary {meta["text_vocab"]} ids (compact GPT-2 BPE), image vocabulary {meta["image_vocab"]}.

{training}

{history}

## Evaluation on held-out clips (`m2 eval`, test split: clips never seen in training)

{markdown(report)}
### Against zero velocity, per future step

{_gain_table(cn)}

ADE {cn["ade"]:.4f} vs zero velocity {zv["ade"]:.4f} ({100 * (cn["ade"] / zv["ade"] - 1):+.1f}%:
{"M2 is better" if cn["ade"] < zv["ade"] else "M2 is NOT better than zero velocity"}); FDE {cn["fde"]:.4f} vs {zv["fde"]:.4f}
({100 * (cn["fde"] / zv["fde"] - 1):+.1f}%).

### Image tokenizer (held-out frames)

| method | PSNR (dB) |
|---|---|
| tokenizer (16x16 ids, {tok.get("vocab_size", meta["image_vocab"])} codes) | {tok["psnr"]:.2f} |
| 16x16 block mean | {tok["psnr_block_mean"]:.2f} |
| nearest 16x16 down/up | {tok["psnr_nearest"]:.2f} |

Codebook usage on held-out frames: {100 * tok["codebook_usage"]:.1f}%.

## Reproduce (what the tests check)

`tests/test_demo_checkpoint.py` re-renders {repro["clips"]} clips with seed {repro["seed"]}
(frames {repro["frames"][0]}-{repro["frames"][1]}), prepares them with this checkpoint's
tokenizers (`m2 prepare --tokenizer checkpoints/m2-demo --all-to test`) and runs `m2 eval`:
ADE {repro["report"]["coords_next"]["ade"]:.4f} (zero velocity {repro["report"]["coords_next"]["zero_velocity"]["ade"]:.4f}),
FDE {repro["report"]["coords_next"]["fde"]:.4f} (zero velocity {repro["report"]["coords_next"]["zero_velocity"]["fde"]:.4f}),{_from_frame(repro["report"])}
PCK@0.05 now {repro["report"]["coords"]["pck@0.05"]:.3f}, caption names the action
{repro["report"]["captions"]["action_accuracy"]:.3f} (from the frame alone
{repro["report"]["captions"].get("action_accuracy_from_frame", float("nan")):.3f}), mean CE {repro["report"]["ce"]["mean"]:.3f}.

## Limits

Trained on {meta["source"].get("synth", {}).get("clips", "?")} synthetic clips of one rendered
figure on simple backgrounds. On real photos it will not find people reliably: the
skeleton, caption and forecast are only meaningful for frames that look like `m2 synth`'s. `/predict` warns `out_of_domain` for frames unlike them (`in_domain.safetensors`, from
`m2 calibrate-domain`): 91% of a corpus of photos, blank, solid, noise and screenshot
images, and 3-4% of frames of new synthetic clips (docs/in_domain.md).
Captions only know the ten synthetic actions and the words of the synthetic captions.

## Model config

```yaml
{yaml.safe_dump(config["model"], sort_keys=False).strip()}
```
"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path, required=True)
    ap.add_argument("--work", type=Path, required=True, help="folder make_demo.sh worked in")
    ap.add_argument("--history", default="", help="a paragraph on how this checkpoint came about")
    ap.add_argument("--earlier", type=Path, nargs="+", default=None,
                    help="serving checkpoints of the stages before the last, in order "
                         "(WORK/run/final WORK/finetune/best)")  # fmt: skip
    args = ap.parse_args(argv)
    try:
        text = card(args.checkpoint, args.work, args.history, args.earlier)
    except (FileNotFoundError, KeyError, json.JSONDecodeError) as e:
        print(f"model_card: error: {e}", file=sys.stderr)
        return 2
    tmp = args.checkpoint / "MODEL_CARD.md.tmp"
    tmp.write_text(text)
    tmp.replace(args.checkpoint / "MODEL_CARD.md")
    print(f"wrote {args.checkpoint / 'MODEL_CARD.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
