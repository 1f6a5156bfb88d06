"""How far the given action can steer the motion path's forecast, and in which form it should
enter: the path's MLP (shape features of one true skeleton -> every future displacement)
with the action joined four ways, trained and scored without the trunk (docs/model.md,
run 20).

    python scripts/probe_steering.py data/demo-v3/synth [--steps 2000 --batch 128]

- `none`: no action (the path before run 18);
- `add`: a row per action added to the shape features before the output layer
  (`model.motion_action` today);
- `film`: the shape features scaled and shifted per action;
- `deep`: the added row, then one more hidden layer, so the action and the shape interact
  (docs/model.md, run 20).

Half the training pairs carry their label, as the run's extra pairs do. Scored on the
held-out clips where the label leads the motion (a frame's label names the action AHEAD
frames on, so there the pose still shows the earlier one): ADE with no action, the coming
(true) one and the shown one, over zero velocity. Needs `m2 synth --switch-share` data.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from probe_shape_features import AHEAD, load
from torch import nn

from m2core.adapters.pose import ShapeFourier

DIM = 256  # the tiny preset's width


class MotionPath(nn.Module):
    def __init__(self, kind: str, d_in: int, d_out: int, actions: int, fourier: int):
        super().__init__()
        self.kind = kind
        self.shape = nn.Sequential(ShapeFourier(fourier, cols=torch.arange(26)),
                                   nn.Linear(d_in + 2 * fourier, DIM), nn.GELU(),
                                   nn.Linear(DIM, DIM))  # fmt: skip
        self.add = nn.Embedding(actions + 1, DIM)  # row 0: none
        self.gain = nn.Embedding(actions + 1, DIM)
        nn.init.normal_(self.add.weight, std=0.02)
        nn.init.zeros_(self.gain.weight)
        self.hidden = nn.Linear(DIM, DIM) if kind == "deep" else None
        self.out = nn.Linear(DIM, d_out)

    def forward(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        f = self.shape(x)
        if self.kind == "film":
            f = f * (1 + self.gain(a + 1))
        if self.kind != "none":
            f = f + self.add(a + 1)
        if self.hidden is not None:
            f = self.hidden(nn.functional.gelu(f))
        return self.out(nn.functional.gelu(f))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("synth", type=Path, help="an m2 synth folder made with --switch-share")
    ap.add_argument("--clips", type=int, default=2000)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--fourier", type=int, default=256)
    ap.add_argument("--kinds", default="none,add,film,deep")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--horizon", type=int, default=AHEAD, help="frames to the last future skeleton")
    ap.add_argument(
        "--lead-share",
        type=float,
        default=0.0,
        help="share of each batch drawn where the label leads",
    )
    args = ap.parse_args(argv)
    if args.steps < 40:
        ap.error("--steps must be >= 40 (the one-cycle warm-up is 5% of them)")
    torch.set_num_threads(1)
    d = load(args.synth, args.clips, args.horizon)
    tr = ~d["test"]
    lead = d["test"] & (d["shown"] >= 0) & (d["shown"] != d["action"])
    if not lead.any():
        raise SystemExit(f"{args.synth}: no held-out sample where the label leads the motion")
    x, y, act = d["feats"][tr], d["move"][tr].flatten(1), d["action"][tr]
    leads = torch.nonzero((d["shown"][tr] >= 0) & (d["shown"][tr] != act)).flatten()
    n_lead = round(args.batch * args.lead_share)
    classes = int(d["action"].max()) + 1
    ext, seen, move = d["extent"][lead][:, None], d["seen"][lead].float(), d["move"][lead]

    def ade(pred: torch.Tensor) -> float:  # frame units, over the joints seen then and now
        err = ((pred.view(-1, AHEAD, 13, 2) - move) * ext).norm(dim=-1)
        return float((err * seen).sum() / seen.sum())

    zv = float(((move * ext).norm(dim=-1) * seen).sum() / seen.sum())
    print(f"{int(tr.sum())} training samples ({len(leads)} where the label leads, "
          f"{args.lead_share:g} of a batch); {int(lead.sum())} held-out where it leads; "
          f"{args.steps} x {args.batch}; horizon {args.horizon} frames; zero velocity there {zv:.4f}")  # fmt: skip
    print("| action enters | no action | coming | shown | coming / no | shown / no |")
    print("|---|---|---|---|---|---|")
    for kind in args.kinds.split(","):
        rows = []
        for seed in (int(s) for s in args.seeds.split(",")):
            torch.manual_seed(seed)
            net = MotionPath(kind, x.shape[1], y.shape[1], classes, args.fourier)
            opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.05)
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, 1e-3, total_steps=args.steps,
                                                        pct_start=0.05)  # fmt: skip
            gen = torch.Generator().manual_seed(seed)
            for _ in range(args.steps):
                i = torch.randint(0, len(x), (args.batch - n_lead,), generator=gen)
                j = torch.randint(0, len(leads), (n_lead,), generator=gen)
                i = torch.cat([i, leads[j]])
                given = torch.rand(args.batch, generator=gen) < 0.5
                a = torch.where(given, act[i], -1)
                loss = (net(x[i], a) - y[i]).abs().mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
            with torch.no_grad():
                xs = d["feats"][lead]
                rows.append([ade(net(xs, torch.full_like(d["action"][lead], -1))),
                             ade(net(xs, d["action"][lead])), ade(net(xs, d["shown"][lead]))])  # fmt: skip
        no, coming, shown = np.mean(rows, 0)
        print(f"| {kind} | {no:.4f} | {coming:.4f} | {shown:.4f} | {coming / no:.3f} "
              f"| {shown / no:.3f} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
