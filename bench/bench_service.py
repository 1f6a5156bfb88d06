"""Load test of `m2 serve`: dynamic batching on vs off, and where one request's time goes.

    python bench/bench_service.py [--checkpoint DIR] [--requests 48] [--concurrency 8]

For each mode (batching with --max-batch-size, then no batching = max batch 1) it starts
`m2 serve` on a free port, sends a bounded number of /predict requests from concurrent
clients, and prints throughput, p50/p95/p99 latency, errors and the mean batch size.
Then it splits one lone request into decode / queue / model / encode / GIF and compares
the model part with calling the model directly in this process (no HTTP, no queue).

Without a checkpoint (none at checkpoints/m2-demo yet) it builds one of the demo's size
(preset `tiny`, default image tokenizer) with random weights: the speed is that of the
real architecture; the predictions are meaningless.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]


def build_random_checkpoint(directory: Path) -> Path:
    import torch

    from m2core.checkpoint import save_checkpoint
    from m2core.model import M2Config, M2Model
    from m2core.tokenizers.image import ImageTokenizer
    from m2core.tokenizers.text import TextTokenizer

    torch.manual_seed(0)
    text = TextTokenizer.build(["a person doing jumping jacks", "a person waving the right arm"])
    image = ImageTokenizer()
    cfg = M2Config.from_preset(
        "tiny", image_vocab=image.vocab_size, text_vocab=text.vocab_size, caption_len=text.max_len
    )
    save_checkpoint(directory, M2Model(cfg), image_tokenizer=image, text_tokenizer=text)
    return directory


def frame_png(seed: int, w: int = 320, h: int = 240) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    arr = np.stack([xx * 255 // w, yy * 255 // h, np.full_like(xx, rng.integers(0, 255))], -1)
    buf = io.BytesIO()
    Image.fromarray(arr.astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`m2 serve` in a subprocess for the duration of a `with` block."""

    def __init__(self, checkpoint: Path, max_batch: int, max_wait_ms: float):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd = [sys.executable, "-m", "training.cli", "serve", "--checkpoint", str(checkpoint),
                    "--port", str(self.port), "--device", "cpu", "--log-level", "warning",
                    "--max-batch-size", str(max_batch), "--max-wait-ms", str(max_wait_ms),
                    "--max-queue", "1024"]  # fmt: skip

    def __enter__(self) -> Server:
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "M2_REQUEST_TIMEOUT_S": "600"}
        self.proc = subprocess.Popen(self.cmd, cwd=REPO, env=env)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"bench: m2 serve exited with {self.proc.returncode}")
            try:
                if httpx.get(self.url + "/readyz", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise SystemExit("bench: server not ready after 180 s")

    def cpu_seconds(self) -> float:
        """User + system CPU time the server process has used so far (Linux /proc), or nan.

        Less disturbed than wall time by other jobs on a shared machine."""
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return float("nan")
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


async def drive(url: str, n: int, concurrency: int, steps: int) -> dict:
    """n requests, `concurrency` at a time -> latencies, statuses, batch sizes, wall time."""
    frames = [frame_png(i) for i in range(8)]
    latencies, codes, batches = [], [], []
    todo = iter(range(n))

    async def worker(client: httpx.AsyncClient) -> None:
        for i in todo:
            files = {"frame": ("f.png", frames[i % len(frames)], "image/png")}
            t0 = time.perf_counter()
            try:
                r = await client.post(
                    "/predict", files=files, data={"steps": str(steps), "seed": str(i)}
                )
                codes.append(r.status_code)
                if r.status_code == 200:
                    batches.append(r.json()["timings_ms"]["batch_size"])
            except httpx.HTTPError:
                codes.append(-1)
            latencies.append(time.perf_counter() - t0)

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return {"lat": latencies, "codes": codes, "batches": batches, "wall": wall}


def summarise(name: str, r: dict) -> dict:
    lat = np.asarray(r["lat"]) * 1000
    ok = sum(c == 200 for c in r["codes"])
    row = {
        "mode": name, "requests": len(r["codes"]), "errors": len(r["codes"]) - ok,
        "throughput": ok / r["wall"], "p50": np.percentile(lat, 50), "p95": np.percentile(lat, 95),
        "p99": np.percentile(lat, 99), "batch": statistics.mean(r["batches"]) if r["batches"] else 0,
        "cpu": r["cpu"] / max(ok, 1),
    }  # fmt: skip
    print(f"{name:<14} {row['requests']:>5} {row['errors']:>6} {row['throughput']:>9.2f} "
          f"{row['p50']:>8.0f} {row['p95']:>8.0f} {row['p99']:>8.0f} {row['batch']:>6.2f} "
          f"{row['cpu']:>9.2f}")  # fmt: skip
    return row


def split_one_request(url: str, steps: int, repeats: int = 5) -> dict:
    """Median stage times of lone requests, plus fetching their GIF (rendered on demand)."""
    rows = []
    with httpx.Client(base_url=url, timeout=600) as c:
        for i in range(repeats):
            t0 = time.perf_counter()
            files = {"frame": ("f.png", frame_png(100 + i), "image/png")}
            d = c.post("/predict", files=files, data={"steps": str(steps)}).json()
            client_total = (time.perf_counter() - t0) * 1000
            t1 = time.perf_counter()
            c.get(d["links"]["gif"]).raise_for_status()
            gif_ms = (time.perf_counter() - t1) * 1000
            rows.append({**d["timings_ms"], "client": client_total, "gif": gif_ms})
    return {k: statistics.median(r[k] for r in rows) for k in rows[0]}


def direct_model_ms(checkpoint: Path, steps: int, repeats: int = 5) -> float:
    """The same work as the server's model stage, called directly: tokenize, generate, decode."""
    import torch

    from m2core.checkpoint import load_checkpoint
    from m2core.generate import GenerationConfig, generate
    from m2core.geometry import letterbox, load_image

    b = load_checkpoint(checkpoint)
    times = []
    for i in range(repeats + 1):
        frame, _ = letterbox(load_image(frame_png(100 + i)))
        t0 = time.perf_counter()
        with torch.inference_mode():
            tok = b.image_tokenizer.encode(frame[None]).reshape(1, -1)
            res = generate(b.model, {"tok_rgb": tok}, GenerationConfig(steps=steps, seed=[0]))
            b.image_tokenizer.decode(res.tok_rgb_next.reshape(-1, 16, 16))
        if i:  # the first call warms up
            times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path, default=REPO / "checkpoints" / "m2-demo")
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-batch-size", type=int, default=8)
    ap.add_argument("--max-wait-ms", type=float, default=10.0)
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=1, help="repeat both modes, alternating")
    args = ap.parse_args(argv)
    tmp = None
    ckpt = args.checkpoint
    if not ckpt.is_dir():
        tmp = tempfile.TemporaryDirectory(prefix="m2-bench-")
        ckpt = build_random_checkpoint(Path(tmp.name) / "ckpt")
        print(f"no checkpoint at {args.checkpoint}: using a random one of the demo's size ({ckpt})")
    print(f"{args.requests} requests, {args.concurrency} concurrent clients, steps={args.steps}, "
          f"{os.cpu_count()} CPUs on this machine")  # fmt: skip
    print(
        f"{'mode':<14} {'reqs':>5} {'errors':>6} {'req/s':>9} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'batch':>6} {'CPU-s/req':>9}"
    )
    rows: dict[str, list[dict]] = {"batching": [], "no batching": []}
    for _ in range(args.rounds):  # alternate the modes: the machine's load drifts
        for name, max_batch in (("batching", args.max_batch_size), ("no batching", 1)):
            with Server(ckpt, max_batch, args.max_wait_ms) as server:
                # Warm every batch shape first (oneDNN builds kernels per new shape).
                asyncio.run(drive(server.url, 2 * args.concurrency, args.concurrency, args.steps))
                cpu0 = server.cpu_seconds()
                result = asyncio.run(drive(server.url, args.requests, args.concurrency, args.steps))
                result["cpu"] = server.cpu_seconds() - cpu0
                rows[name].append(summarise(name, result))
                if name == "batching" and len(rows[name]) == 1:
                    split = split_one_request(server.url, args.steps)
                    direct = direct_model_ms(ckpt, args.steps)  # right after, server idle
    ratios = [
        a["throughput"] / max(b["throughput"], 1e-9)
        for a, b in zip(rows["batching"], rows["no batching"], strict=True)
    ]
    ratio = statistics.median(ratios)
    cpu_ratios = [
        b["cpu"] / max(a["cpu"], 1e-9)
        for a, b in zip(rows["batching"], rows["no batching"], strict=True)
    ]
    print(f"per round: {', '.join(f'{r:.2f}x' for r in ratios)} (throughput); "
          f"{', '.join(f'{r:.2f}x' for r in cpu_ratios)} (server CPU per request saved)")  # fmt: skip
    print(f"throughput ratio batching / no batching (median): {ratio:.2f}x "
          f"(max batch {args.max_batch_size}, max wait {args.max_wait_ms:g} ms)")  # fmt: skip
    print("one lone request (median of 5), ms: " + ", ".join(
        f"{k} {split[k]:.1f}" for k in ("decode", "queue", "model", "encode", "total", "gif", "client")
    ))  # fmt: skip
    print(
        f"the model called directly (tokenize + generate + decode, no HTTP): {direct:.1f} ms; "
        f"server overhead around the model: {split['client'] - split['model']:.1f} ms per request"
    )
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
