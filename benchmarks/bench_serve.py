"""``edge-runtime serve`` on a camera-like file: drops, latency, decode cost, fps, memory.

    python benchmarks/bench_serve.py --out DIR [--frames 1800] [--start 1400]
                                     [--scenario fashion-drift]

1. Writes ``DIR/frames.npz``: frames ``--start`` .. ``--start + --frames`` of the scenario's
   stream (Fashion-MNIST; by default a window with its first drift, at stream frame 2000, in
   it) with the stream's training set, and ``DIR/clip.mp4``: those frames upscaled to 640x480
   RGB, H.264 (libx264, yuv420p) at 30 fps.
2. ``paced``: serves it at real time (``--rate 30``: the file delivers as a camera would,
   newest frame wins, stale ones dropped and counted) on the default config (64 px encoder,
   ONNX Runtime on the CPU) with ``encoder.batch_size=1``: frames dropped, decision latency
   (a frame leaving its decoder -> its decision) p50/p99, peak RSS.
3. ``unpaced``: serves it as fast as it goes on the default config (batch 32): frames/s,
   peak RSS.
4. ``run``: ``edge-runtime run`` on the same frames (``DIR/frames.npz``: before the codec)
   for its frames/s and peak RSS: the peer a user would otherwise use. It answers label
   requests from the stream's labels, so it also trains an adaptor while serving; ``serve``
   has no operator here, so it only flags.
5. Decode cost per frame (PyAV decode alone, and decode + conversion to the served frame
   shape) beside the encoder's cost per frame at batch 1 and 32.

Each serve leg runs in its own process (``--child``), so its RSS is its own; RSS snapshots
after each setup step (``cli.serve.build``'s ``mark``) say where the memory goes. Prints a
table, writes ``DIR/bench_serve.json`` and ``DIR/bench_serve.png`` (latency histogram).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

W, H, FPS = 640, 480, 30


def rss_mb() -> dict[str, float]:
    """This process's resident memory now and at its peak (VmRSS, VmHWM), MB."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = round(int(value.split()[0]) / 1024.0, 1)
    return out


# ------------------------------------------------------------------------------ child
def child(leg: str, clip: str, scenario: str, out: str) -> dict[str, Any]:
    marks: list[tuple[str, float]] = [("python", rss_mb()["VmRSS"])]
    import numpy as np

    marks.append(("numpy", rss_mb()["VmRSS"]))
    import torch  # noqa: F401  (imported by the runtime anyway; here to attribute its RSS)

    marks.append(("torch", rss_mb()["VmRSS"]))
    import onnxruntime  # noqa: F401

    marks.append(("onnxruntime", rss_mb()["VmRSS"]))
    from edge_runtime.cli import serve

    p = argparse.ArgumentParser()
    serve.register(p.add_subparsers())
    argv = ["serve", "--source", clip, "--base", scenario, "--out", out, "--no-progress"]
    if leg == "paced":
        argv += ["--rate", str(FPS), "--set", "encoder.batch_size=1"]
    args = p.parse_args(argv)
    server = serve.build(args, mark=lambda step: marks.append((step, rss_mb()["VmRSS"])))
    sample: list[np.ndarray] = []

    def keep(item: Any) -> None:  # a few served frames, for the encoder's cost below
        if len(sample) < 256:
            sample.extend(np.asarray(item.batch.images))

    server.observers.append(keep)
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    try:
        summary = server.run()
        serve_s = time.perf_counter() - t0
        marks.append(("served", rss_mb()["VmRSS"]))
        peak = rss_mb()["VmHWM"]
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
        latencies = list(server.metrics.latencies)
        enc = server.rt.encoder
        frames = np.stack(sample[:256])
        # At the leg's own batch size (the encoder splits larger calls into batches of it).
        bs = int(enc.batch_size)
        enc.features(frames[:bs])  # warm
        t = time.perf_counter()
        for a in range(0, len(frames), bs):
            enc.features(frames[a : a + bs])
        cost = {bs: (time.perf_counter() - t) / len(frames) * 1e3}
    finally:
        server.close()
        server.rt.close()
    m = summary.metrics
    return {
        "leg": leg,
        "backend": type(enc.backend).__name__ if hasattr(enc, "backend") else str(enc),
        "batch_size": int(server.rt.config.encoder.batch_size),
        "input_size": int(server.rt.config.encoder.input_size),
        "frames_served": m["frames_served"],
        "frames_dropped": m["frames_dropped"],
        "frames_decoded": sum(s["decoded"] for s in m["sources"].values()),
        "serve_seconds": round(serve_s, 3),
        "frames_per_second": round(m["frames_served"] / serve_s, 1),
        "latencies_s": latencies,
        "peak_rss_mb": peak,
        "ru_maxrss_mb": round(maxrss, 1),
        "rss_marks_mb": marks,
        "encoder_ms_per_frame": {str(k): round(v, 3) for k, v in cost.items()},
        "drift_flags": m["drift_flags"],
        "loadavg_start": load0,
        "loadavg_end": os.getloadavg(),
    }


# ------------------------------------------------------------------------------ parent
def write_clip(path: Path, images: Any) -> None:
    import av
    import numpy as np
    from PIL import Image

    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=FPS)
        s.width, s.height, s.pix_fmt = W, H, "yuv420p"
        s.options = {"crf": "23", "preset": "veryfast"}
        for img in images:
            big = Image.fromarray(np.asarray(img)).convert("RGB").resize((W, H), Image.BILINEAR)
            frame = av.VideoFrame.from_ndarray(np.asarray(big), format="rgb24")
            for pkt in s.encode(frame):
                c.mux(pkt)
        for pkt in s.encode():
            c.mux(pkt)


def decode_cost(clip: Path, shape: tuple[int, ...]) -> dict[str, float]:
    """ms per frame: PyAV decode to RGB alone, and the serve source (decode + shaping)."""
    import av

    from edge_runtime.sources import FrameFormat, open_source

    t, n = time.perf_counter(), 0
    with av.open(str(clip)) as c:
        for frame in c.decode(video=0):
            frame.to_ndarray(format="rgb24")
            n += 1
    raw = (time.perf_counter() - t) / n * 1e3
    src = open_source(str(clip), frame_format=FrameFormat.like(shape))
    t, m = time.perf_counter(), 0
    for _ in src.frames():
        m += 1
    src.close()
    return {
        "decode_ms": round(raw, 3),
        "decode_and_shape_ms": round((time.perf_counter() - t) / m * 1e3, 3),
    }


def window(scenario: Path, start: int, n: int, dest: Path) -> Any:
    """Frames ``start .. start + n`` of the stream as a stream file of their own (segments and
    eval sets renumbered to the ones in the window; the training set unchanged)."""
    import dataclasses

    import numpy as np

    from edge_runtime.data import save_stream
    from edge_runtime.data.stream import load_stream

    s = load_stream(scenario)
    seg = s.segment[start : start + n]
    ids = np.unique(seg)
    keep = np.isin(s.eval_segment, ids)
    sub = dataclasses.replace(
        s,
        images=s.images[start : start + n],
        labels=s.labels[start : start + n],
        segment=np.searchsorted(ids, seg),
        is_novel=s.is_novel[start : start + n],
        segment_is_shift=s.segment_is_shift[ids],
        eval_images=s.eval_images[keep],
        eval_labels=s.eval_labels[keep],
        eval_segment=np.searchsorted(ids, s.eval_segment[keep]),
    )
    save_stream(sub, dest)
    return sub


def run_peer(scenario: Path, out: Path) -> dict[str, Any]:
    cmd = [
        sys.executable,
        "-m",
        "edge_runtime",
        "run",
        "--stream",
        str(scenario),
        "--out",
        str(out),
    ]
    cmd += ["--no-baselines", "--no-progress"]
    load0 = os.getloadavg()
    subprocess.run(cmd, check=True, capture_output=True)
    m = json.loads((out / "metrics.json").read_text())
    return {
        "command": " ".join(cmd[1:]),
        "frames_per_second": m.get("frames_per_second"),
        "peak_rss_mb": m.get("peak_rss_mb"),
        "loadavg_start": load0,
        "loadavg_end": os.getloadavg(),
    }


def plot(lat_ms: Any, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.hist(lat_ms, bins=60, color="#3573a5")
    for q, style in ((50, "--"), (99, ":")):
        v = float(np.percentile(lat_ms, q))
        ax.axvline(v, color="k", linestyle=style, label=f"p{q} {v:.1f} ms")
    ax.axvline(50, color="r", label="bar 50 ms")
    ax.set_xlabel("decode -> decision latency (ms), batch 1, 30 fps paced")
    ax.set_ylabel("frames")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--frames", type=int, default=1800, help="clip length (default 60 s)")
    ap.add_argument("--start", type=int, default=1400, help="first stream frame of the clip")
    ap.add_argument("--scenario", default="fashion-drift")
    ap.add_argument(
        "--child", nargs=4, metavar=("LEG", "CLIP", "SCENARIO", "OUT"), help=argparse.SUPPRESS
    )
    a = ap.parse_args()
    if a.child:
        result = child(*a.child)
        Path(a.child[3], "child.json").write_text(json.dumps(result))
        return 0

    import numpy as np

    from edge_runtime.cli.demo import cached_scenario

    a.out.mkdir(parents=True, exist_ok=True)
    scenario = a.out / "frames.npz"
    stream = window(cached_scenario(a.scenario), a.start, a.frames, scenario)
    images = stream.images
    shape = stream.train_images.shape[1:]
    del stream
    clip = a.out / "clip.mp4"
    t = time.perf_counter()
    write_clip(clip, images)
    print(f"wrote {clip}: {len(images)} frames {W}x{H} H.264 in {time.perf_counter() - t:.0f} s")
    legs = {}
    for leg in ("paced", "unpaced"):
        out = a.out / leg
        out.mkdir(exist_ok=True)
        cmd = [
            sys.executable,
            __file__,
            "--out",
            str(out),
            "--child",
            leg,
            str(clip),
            str(scenario),
            str(out),
        ]
        subprocess.run(cmd, check=True)
        legs[leg] = json.loads((out / "child.json").read_text())
        print(f"{leg}: {legs[leg]['frames_served']} served, {legs[leg]['peak_rss_mb']} MB peak")
    peer = run_peer(scenario, a.out / "run")
    dec = decode_cost(clip, shape)
    paced, unpaced = legs["paced"], legs["unpaced"]
    lat = np.asarray(paced.pop("latencies_s")) * 1e3
    unpaced.pop("latencies_s")
    decoded = paced["frames_decoded"]
    report = {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "python": platform.python_version(),
        },
        "clip": {
            "frames": len(images),
            "stream_frames": [a.start, a.start + len(images)],
            "size": f"{W}x{H}",
            "fps": FPS,
            "codec": "h264",
        },
        "paced": {
            **paced,
            "dropped_pct": round(100.0 * paced["frames_dropped"] / max(decoded, 1), 3),
            "latency_ms": {
                "p50": round(float(np.percentile(lat, 50)), 2),
                "p99": round(float(np.percentile(lat, 99)), 2),
                "max": round(float(lat.max()), 2),
                "n": len(lat),
            },
        },
        "unpaced": unpaced,
        "run": peer,
        "decode": dec,
    }
    (a.out / "bench_serve.json").write_text(json.dumps(report, indent=2))
    plot(lat, a.out / "bench_serve.png")
    p = report["paced"]
    rows = [
        (
            "frames dropped at 30 fps (bar <= 1%)",
            f"{p['frames_dropped']} of {decoded} ({p['dropped_pct']}%)",
        ),
        (
            "latency p50 / p99, batch 1 (bar p99 <= 50 ms)",
            f"{p['latency_ms']['p50']} / {p['latency_ms']['p99']} ms",
        ),
        (
            "decode per frame (PyAV / + shaping)",
            f"{dec['decode_ms']} / {dec['decode_and_shape_ms']} ms",
        ),
        (
            "encoder per frame (batch 1 / 32)",
            f"{p['encoder_ms_per_frame']['1']} / {unpaced['encoder_ms_per_frame']['32']} ms",
        ),
        (
            "unpaced fps: serve (mp4) / run (npz)",
            f"{unpaced['frames_per_second']} / {peer['frames_per_second']}",
        ),
        (
            "peak RSS serve paced b1 / unpaced b32 (bar <= 600 MB)",
            f"{p['peak_rss_mb']} / {unpaced['peak_rss_mb']} MB",
        ),
        ("peak RSS run (no baselines)", f"{peer['peak_rss_mb']} MB"),
        ("backend / encoder input", f"{p['backend']} / {p['input_size']} px"),
    ]
    width = max(len(r[0]) for r in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    print("RSS after each step (MB), unpaced leg:")
    prev = 0.0
    for step, mb in unpaced["rss_marks_mb"]:
        print(f"  {step:<14} {mb:8.1f}  (+{mb - prev:.1f})")
        prev = mb
    print(f"wrote {a.out / 'bench_serve.json'} and {a.out / 'bench_serve.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
