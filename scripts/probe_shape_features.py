"""How fast a small MLP learns the action and the next six skeletons from one true skeleton,
with the skeleton's shape as raw normalised positions or with random Fourier features of
them (the two ways `model.shape_fourier` can bring the shape into M2; docs/model.md run 14).

    python scripts/probe_shape_features.py data/demo-v2/synth [--steps 767 --batch 64]

Reads `m2 synth` labels directly: key frames at hop 3, the last 15% of clips held out.
Forecast: L1 regression of each joint's displacement over t+1..t+6 in units of the skeleton's
extent; ADE over joints visible now and then, against zero velocity. Action: cross-entropy,
accuracy on the held-out clips. A few seconds per arm on one core.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import scipy.io
import torch
import torch.nn.functional as F
from torch import nn

from m2core.adapters.pose import ShapeFourier

HOP, AHEAD = 3, 6  # key-frame hop; future skeletons (and frames a label leads, m2 synth)


def load(root: Path, clips: int, horizon: int = AHEAD) -> dict[str, torch.Tensor]:
    """-> features (N, 27): 26 positions around the skeleton's centre over its extent, and its
    log extent; move (N, 6, 13, 2) in extents, `horizon` / 6 frames apart; extent; seen
    (N, 6, 13); action (the frame's label); shown (the label AHEAD frames earlier, which
    the pose still shows; -1 before it); test."""
    rows: list[tuple] = []
    files = sorted((root / "labels").glob("*.mat"))[:clips]
    if not files:
        raise SystemExit(f"{root}/labels: no .mat files (make them with m2 synth)")
    actions: list[str] = []
    for ci, f in enumerate(files):
        m = scipy.io.loadmat(f)
        xy = np.stack([m["x"], m["y"]], -1) / float(max(m["dimensions"][0][:2]))
        vis = m["visibility"].astype(bool)
        # a clip that switches action has a label per frame (m2 synth --switch-share)
        names = [str(a).strip() for a in m.get("frame_action", [m["action"][0]] * len(xy))]
        for name in names:
            if name not in actions:
                actions.append(name)
        label = [actions.index(n) for n in names]
        ahead = [round(k * horizon / AHEAD) for k in range(1, AHEAD + 1)]  # as m2 prepare
        for t in range(0, len(xy) - horizon, HOP):
            shown = label[t - AHEAD] if t >= AHEAD else -1
            at = [t + k for k in ahead]
            rows.append((ci, label[t], xy[t], vis[t], xy[at], vis[at], shown))
    col = lambda i, dt=torch.float32: torch.tensor(np.stack([r[i] for r in rows]), dtype=dt)  # noqa: E731
    now, fut = col(2), col(4)
    centre = now.mean(1, keepdim=True)
    extent = (now.amax(1) - now.amin(1)).amax(-1).clamp(min=0.02)[:, None, None]
    feats = torch.cat([((now - centre) / extent).flatten(1), extent[:, 0].log()], 1)
    clip = torch.tensor([r[0] for r in rows])
    return {
        "feats": feats, "move": (fut - now[:, None]) / extent[:, None], "extent": extent,
        "seen": col(3, torch.bool)[:, None] & col(5, torch.bool),
        "action": torch.tensor([r[1] for r in rows]), "shown": torch.tensor([r[6] for r in rows]),
        "test": clip >= int(len(files) * 0.85),
    }  # fmt: skip


def mlp(d_in: int, d_out: int, fourier: int, sigma: float, seed: int) -> nn.Sequential:
    front = [ShapeFourier(fourier, sigma, seed, cols=torch.arange(26))] if fourier else []
    d = d_in + 2 * fourier
    return nn.Sequential(*front, nn.Linear(d, 192), nn.GELU(), nn.Linear(192, 192), nn.GELU(),
                         nn.Linear(192, d_out))  # fmt: skip


def fit(net: nn.Module, x: torch.Tensor, loss_fn, steps: int, batch: int, seed: int) -> nn.Module:
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 1e-3, total_steps=steps, pct_start=0.05)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        i = torch.randint(0, len(x), (batch,), generator=gen)
        loss = loss_fn(net(x[i]), i)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return net


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("synth", type=Path, help="an m2 synth folder")
    ap.add_argument("--clips", type=int, default=2000)
    ap.add_argument("--steps", type=int, default=767)
    ap.add_argument("--action-steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--fourier", type=int, default=256, help="features (sin and cos each)")
    ap.add_argument("--sigmas", default="0,0.5,1,2", help="0: the raw positions only")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--horizon", type=int, default=AHEAD, help="frames to the last future skeleton")
    args = ap.parse_args(argv)
    if min(args.steps, args.action_steps) < 40:
        ap.error("--steps and --action-steps must be >= 40 (the warm-up is 5% of them)")
    torch.set_num_threads(1)
    d = load(args.synth, args.clips, args.horizon)
    tr, te = ~d["test"], d["test"]
    x_tr, x_te = d["feats"][tr], d["feats"][te]
    y_tr = d["move"][tr].flatten(1)

    def ade(pred: torch.Tensor) -> float:  # frame units, over the joints seen then and now
        ext, seen = d["extent"][te][:, None], d["seen"][te].float()
        err = ((pred.view(-1, AHEAD, 13, 2) - d["move"][te]) * ext).norm(dim=-1)
        still = (d["move"][te] * ext).norm(dim=-1)
        return float((err * seen).sum() / (still * seen).sum())

    print(f"{int(tr.sum())} training / {int(te.sum())} held-out samples; "
          f"forecast {args.steps} x {args.batch}, action {args.action_steps} x {args.batch}")  # fmt: skip
    print("| sigma | forecast ADE / zero velocity | action accuracy |\n|---|---|---|")
    for sigma in (float(s) for s in args.sigmas.split(",")):
        fore, act = [], []
        for seed in (int(s) for s in args.seeds.split(",")):
            n = args.fourier if sigma > 0 else 0
            torch.manual_seed(seed)
            net = fit(mlp(x_tr.shape[1], y_tr.shape[1], n, sigma, seed), x_tr,
                      lambda p, i: (p - y_tr[i]).abs().mean(), args.steps, args.batch, seed)  # fmt: skip
            torch.manual_seed(seed)
            cls = fit(mlp(x_tr.shape[1], int(d["action"].max()) + 1, n, sigma, seed), x_tr,
                      lambda p, i: F.cross_entropy(p, d["action"][tr][i]), args.action_steps,
                      args.batch, seed)  # fmt: skip
            with torch.no_grad():
                fore.append(ade(net(x_te)))
                act.append(float((cls(x_te).argmax(-1) == d["action"][te]).float().mean()))
        print(f"| {sigma:g} | {np.mean(fore):.3f} ({' / '.join(f'{v:.3f}' for v in fore)}) "
              f"| {np.mean(act):.3f} ({' / '.join(f'{v:.3f}' for v in act)}) |")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
