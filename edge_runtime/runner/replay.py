"""``run_stream``: replay a stream file through the runtime under test-then-train, write outputs.

Shared by ``edge-runtime run`` and ``edge-runtime demo``. It wires the runner's parts:

* the base domain is fitted from the stream's training set (:func:`prepare`);
* :class:`~edge_runtime.runner.loop.ServeLoop` serves the frames in batches
  (``data.stream.iter_batches``), paced at ``rate`` frames/s when given;
* :class:`~edge_runtime.runner.labels.StreamLabels` answers the runtime's label requests
  from the stream (labels are revealed only for the frames the runtime asks about after a
  drift flag, at most ``adapt.label_budget`` per flag);
* the event log's sinks write ``events.jsonl`` as events happen (an interrupted run keeps
  them) and keep them in memory for scoring;
* :class:`~edge_runtime.runner.metrics.ServedCollector` keeps the served decisions;
  scoring, the baselines and the acceptance checks turn them into ``metrics.json``;
* :mod:`~edge_runtime.runner.outputs` writes ``frames.npz`` and ``metrics.json`` atomically.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from edge_runtime.acceptance import acceptance_checks
from edge_runtime.config.schema import RuntimeConfig
from edge_runtime.data.stream import Stream
from edge_runtime.encoder.cache import cached_features
from edge_runtime.errors import InputError
from edge_runtime.events import JsonlSink, ListSink, jsonable, strict_json
from edge_runtime.fleet.attach import attach
from edge_runtime.runner.labels import LabelSource, StreamLabels
from edge_runtime.runner.loop import (
    BatchObserver,
    Interrupt,
    ServedBatch,
    ServeLoop,
    ServeOutcome,
)
from edge_runtime.runner.metrics import (
    ServedCollector,
    add_segment_counts,
    delay_metrics,
    event_counts,
    peak_rss_mb,
)
from edge_runtime.runner.outputs import FrameOutputs, write_outputs
from edge_runtime.runner.pacing import Pacer
from edge_runtime.runner.pressure import MemoryGovernor
from edge_runtime.runner.resume import (
    CHECKPOINTS,
    OutboxGuard,
    ResumePoint,
    RunCheckpointer,
    load_resume,
    read_events,
    run_id_for,
    stream_digest,
)
from edge_runtime.runtime import Runtime
from edge_runtime.scoring import adapted_mask, score_run
from edge_runtime.state.series import DEFAULT_KEEP, CheckpointSeries

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    metrics: dict[str, Any]
    out_dir: Path
    interrupted: bool
    events: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class BaseSetup:
    """The base domain and the features computed once before serving."""

    train_x: np.ndarray
    eval_x: np.ndarray
    # Eval predictions before any adaptation (the base of the forgetting metric), or None.
    eval_before: np.ndarray | None
    fit_report: dict[str, Any]
    seconds: float

    @property
    def has_eval(self) -> bool:
        return len(self.eval_x) > 0


def prepare(rt: Runtime, stream: Stream, *, progress: bool = False) -> BaseSetup:
    """Fit the base domain from the labelled training set (unless the runtime has domains
    already) and encode the eval frames once (cheap snapshots later)."""
    t0 = time.perf_counter()
    enc = rt.encoder
    train_x = cached_features(enc, stream.train_images, "train", progress=progress and "train set")
    fit_report = (
        rt.fit_base(stream.train_images, stream.train_labels, features=train_x)
        if not rt.domains
        else {}
    )
    has_eval = len(stream.eval_images) > 0
    eval_x = (
        cached_features(enc, stream.eval_images, "eval", progress=progress and "eval set")
        if has_eval
        else np.zeros((0, rt.feature_dim), np.float32)
    )
    # Nothing the runtime predicts changes before its first adaptation, so this is the
    # accuracy at the first drift flag, taken here so the snapshot never stalls serving.
    eval_before = (
        rt.predict_eval(stream.eval_images, features=eval_x)[0]
        if has_eval and len(rt.domains) == 1
        else None
    )
    return BaseSetup(train_x, eval_x, eval_before, fit_report, time.perf_counter() - t0)


class _ProgressBar:
    """Serve-loop observer: a tqdm bar with frames/s and the domain serving now."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.bar = tqdm(
            total=total, desc="serving", unit="frame", disable=not enabled, dynamic_ncols=True
        )
        self.t0 = time.perf_counter()

    def __call__(self, item: ServedBatch) -> None:
        b = item.batch
        self.bar.update(b.stop - b.start)
        elapsed = time.perf_counter() - self.t0
        self.bar.set_postfix(
            fps=f"{b.stop / max(elapsed, 1e-9):.0f}",
            domain=int(item.decisions.domain[-1]),
            refresh=False,
        )

    def close(self) -> None:
        self.bar.close()


def run_stream(
    stream: Stream,
    config: RuntimeConfig,
    out_dir: str | Path,
    *,
    progress: bool = True,
    runtime: Runtime | None = None,
    on_batch: Callable[[int, Runtime], None] | None = None,
    stream_path: str | None = None,
    checkpoint: str | Path | None = None,
    baselines: bool = True,
    rate: float | None = None,
    max_frames: int | None = None,
    labels_from: str = "stream",
    resume: bool = False,
    checkpoint_every: int | None = None,
    keep_checkpoints: int = DEFAULT_KEEP,
) -> RunResult:
    """Serve the frames of ``stream``; write frames.npz, events.jsonl, metrics.json.

    With ``config.fleet.enabled`` the device reports to the fleet over MQTT as it serves (see
    :mod:`edge_runtime.fleet.attach`); ``labels_from="fleet"`` then takes labels from the
    operator's label loop instead of the stream file (the naive/joint baselines, which replay
    the revealed labels, are skipped).

    ``rate`` paces the replay as a camera delivering ``rate`` frames/s would (frame ``i``
    arrives ``i / rate`` s after the first); without it frames are served as fast as the
    runtime takes them. ``max_frames`` serves only the first frames of the stream. A
    ``runtime`` passed in is used as is (and not closed); ``on_batch(frames_served, rt)`` is
    called after every batch.

    ``checkpoint_every`` (frames) writes run checkpoints under ``out_dir/checkpoints/`` that
    often and after each adaptation; ``resume`` continues from the newest intact one there
    (see :mod:`edge_runtime.runner.resume`), checkpointing every
    ``DEFAULT_CHECKPOINT_EVERY`` frames when ``checkpoint_every`` is not given. A
    checkpointed run adapts synchronously, so a resumed run's outputs are those of one
    uninterrupted run.
    """
    t_start = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pacer = Pacer(rate) if rate is not None else None  # a bad rate fails before any work
    if labels_from not in ("stream", "fleet"):
        raise InputError(f"labels_from must be 'stream' or 'fleet', got {labels_from!r}")
    if labels_from == "fleet" and not config.fleet.enabled:
        raise InputError("labels from the fleet need fleet.enabled=true (and a broker)")
    n = len(stream) if max_frames is None else max(0, min(len(stream), int(max_frames)))
    if checkpoint_every is not None and int(checkpoint_every) < 1:
        raise InputError(f"checkpoint_every must be >= 1, got {checkpoint_every}")
    if resume and checkpoint_every is None:
        checkpoint_every = DEFAULT_CHECKPOINT_EVERY
    point: ResumePoint | None = None
    if checkpoint_every is not None:
        if runtime is not None:
            raise InputError("a checkpointed run builds its own runtime; do not pass one")
        found = load_resume(out, config, stream, keep=keep_checkpoints) if resume else None
        if found is not None:
            runtime_built, point = found
            # The run goes on with the settings it started with (batch boundaries, budgets);
            # only the fleet link is the one given now (a broker may have moved).
            config = runtime_built.config.model_copy(update={"fleet": config.fleet})
        else:
            # Synchronous adaptation: serving the same frames from a checkpoint then makes
            # the same decisions, so a resumed run's outputs are one run's.
            runtime_built = Runtime(config, background=False)
        rt = runtime_built
        owned = True
    else:
        rt = runtime if runtime is not None else Runtime(config)
        owned = runtime is None
    ckpt = (
        _Checkpointing(
            CheckpointSeries(out / CHECKPOINTS, keep=keep_checkpoints),
            run_id_for(out),
            int(checkpoint_every),
            point,
        )
        if checkpoint_every is not None
        else None
    )
    try:
        return _run(
            rt,
            stream,
            config,
            out,
            pacer=pacer,
            n=n,
            progress=progress,
            on_batch=on_batch,
            stream_path=stream_path,
            checkpoint=checkpoint,
            baselines=baselines and labels_from == "stream",
            fleet_labels=labels_from == "fleet",
            t_start=t_start,
            ckpt=ckpt,
        )
    finally:
        if owned:
            rt.close()


#: Frames between run checkpoints when ``resume`` is asked for without ``checkpoint_every``.
DEFAULT_CHECKPOINT_EVERY = 256


@dataclass
class _Checkpointing:
    """A checkpointed run's settings, and the point it resumes from (None: frame 0)."""

    series: CheckpointSeries
    run_id: str
    every: int
    point: ResumePoint | None


def _run(
    rt: Runtime,
    stream: Stream,
    config: RuntimeConfig,
    out: Path,
    *,
    pacer: Pacer | None,
    n: int,
    progress: bool,
    on_batch: Callable[[int, Runtime], None] | None,
    stream_path: str | None,
    checkpoint: str | Path | None,
    baselines: bool,
    fleet_labels: bool,
    t_start: float,
    ckpt: _Checkpointing | None = None,
) -> RunResult:
    labels = StreamLabels(stream.labels)
    listed = ListSink()
    point = ckpt.point if ckpt is not None else None
    if point is not None:
        # events.jsonl was cut back to the checkpoint's events; the run goes on from there.
        listed.events.extend(read_events(out / "events.jsonl"))
        labels.load_state_dict(point.run["labels"])
    jsonl = JsonlSink(out / "events.jsonl", mode="a" if point is not None else "w")
    sinks = (jsonl, listed, labels)
    stale = rt.drain_events()  # events a runtime passed in had not reported yet
    for sink in sinks:
        for event in stale:
            sink.write(event)
        rt.events.add_sink(sink)
    try:
        with Interrupt() as stop:
            setup = prepare(rt, stream, progress=progress)
            if point is not None:
                _restore_setup(setup, point.run["setup"])
            # After the base fit, so the device's first birth certificate lists its base domain.
            link = attach(rt, config.fleet, labels=fleet_labels) if config.fleet.enabled else None
            collector = ServedCollector(
                len(stream), rt.feature_dim, keep_features=baselines and setup.has_eval
            )
            start = 0
            if point is not None:
                collector.load_state_dict(point.run["collector"])
                start = collector.served
            if pacer is not None:
                pacer.first = start
            bar = _ProgressBar(n, progress)
            bar.bar.update(min(start, n))
            observers: list[BatchObserver] = [collector]
            checkpointer: RunCheckpointer | None = None
            guard: OutboxGuard | None = None
            if ckpt is not None:
                if link is not None:
                    # The guard's own count (commands' events take no ordinal), as saved.
                    numbered = len(listed.events)
                    saved = point.run.get("outbox") if point is not None else None
                    if isinstance(saved, dict) and "events" in saved:
                        numbered = int(saved["events"])
                    guard = OutboxGuard(link.client, ckpt.run_id, numbered)
                    rt.events.add_sink(guard, first=True)
                checkpointer = RunCheckpointer(
                    ckpt.series,
                    ckpt.run_id,
                    ckpt.every,
                    rt,
                    collector,
                    labels,
                    listed.events,
                    out / "events.jsonl",
                    _setup_state(setup),
                    stream_digest(stream),
                    serving_before_s=0.0 if point is None else float(point.run["serving_seconds"]),
                    guard=guard,
                )
            if on_batch is not None:
                observers.append(lambda item: on_batch(item.batch.stop, rt))
            observers.append(bar)
            source: LabelSource = labels
            if link is not None:
                observers.extend(link.observers)
                if link.labels is not None:
                    source = link.labels
            bs = int(config.encoder.batch_size)
            governor = MemoryGovernor(rt, float(config.device.memory_budget_mb), bs)
            observers.append(governor)
            source = governor.wrap(source)
            if checkpointer is not None:
                observers.append(checkpointer)  # last: it saves what the others recorded
            loop = ServeLoop(
                rt,
                source,
                pacer=pacer,
                observers=observers,
                should_stop=stop,
                wait_builds=pacer is None,
            )
            try:
                if point is not None and point.finished and start >= n:
                    # Killed after the end of the stream was checkpointed: nothing to serve
                    # or finish again, only the outputs to write.
                    outcome = ServeOutcome(start, False, 0.0)
                else:
                    # The kill tests time a restart by this line: serving again.
                    log.info("serving frames %d..%d", start, n)
                    outcome = loop.run(governor.batches(stream.images[:n], start))
                    outcome.served = max(outcome.served, start)
                    if checkpointer is not None and not outcome.interrupted:
                        checkpointer.save(finished=True)
            finally:
                bar.close()
                if guard is not None:
                    rt.events.remove_sink(guard)
                if link is not None:
                    link.close()
            if checkpointer is not None:
                outcome.serving_seconds += checkpointer.serving_before_s
            if outcome.interrupted:
                log.warning("interrupted after %d of %d frames; writing outputs", outcome.served, n)
            eval_pred = (
                rt.predict_eval(stream.eval_images, features=setup.eval_x)[0]
                if setup.has_eval
                else np.zeros(0, np.int64)
            )
            if checkpoint is not None:
                rt.save(checkpoint)
    finally:
        for sink in sinks:
            rt.events.remove_sink(sink)
        jsonl.close()
    events = listed.events
    metrics = _metrics(
        stream, config, rt, setup, collector, labels, outcome, events, eval_pred, baselines
    )
    metrics["memory"] = governor.summary()
    metrics["labels_from"] = "fleet" if fleet_labels else "stream"
    metrics.update(
        stream=stream_path,
        wall_seconds=round(time.perf_counter() - t_start, 3),
        **delay_metrics(events, None if pacer is None else pacer.rate),
    )
    metrics["checks"] = acceptance_checks(metrics)  # the one call site of the checks
    metrics = strict_json(jsonable(metrics))
    served = outcome.served
    frames = FrameOutputs(
        collector.served_frames(),
        adapted=adapted_mask(stream.segment, stream.segment_is_shift, events)[:served],
        eval_prediction=eval_pred,
    )
    write_outputs(out, frames, metrics)
    return RunResult(metrics, out, outcome.interrupted, events)


def _setup_state(setup: BaseSetup) -> dict[str, Any]:
    """The base setup's figures a resumed run cannot recompute (its runtime has adapted)."""
    return {
        "eval_before": setup.eval_before,
        "fit_report": strict_json(jsonable(setup.fit_report)),
        "seconds": float(setup.seconds),
    }


def _restore_setup(setup: BaseSetup, state: dict[str, Any]) -> None:
    before = state.get("eval_before")
    setup.eval_before = None if before is None else np.asarray(before, np.int64)
    setup.fit_report = dict(state.get("fit_report") or {})
    setup.seconds = float(state.get("seconds", 0.0)) + setup.seconds


def _metrics(
    stream: Stream,
    config: RuntimeConfig,
    rt: Runtime,
    setup: BaseSetup,
    collector: ServedCollector,
    labels: StreamLabels,
    outcome: ServeOutcome,
    events: list[dict[str, Any]],
    eval_pred: np.ndarray,
    baselines: bool,
) -> dict[str, Any]:
    """Scoring against the stream's ground truth, baselines, and the run's own figures."""
    metrics = score_run(
        collector.served_frames(),
        labels=stream.labels,
        segment=stream.segment,
        segment_is_shift=stream.segment_is_shift,
        is_novel=stream.is_novel,
        eval_labels=stream.eval_labels,
        eval_segment=stream.eval_segment,
        eval_prediction=eval_pred,
        eval_prediction_before_drift=setup.eval_before,
        events=events,
        label_budget=rt.label_budget,
        stream_meta=stream.meta if isinstance(stream.meta, dict) else None,
        # Fleet labels arrive as commands, not through the stream tally.
        labels_revealed=labels.revealed or int(rt.labels_used),
    )
    if baselines and setup.has_eval and not outcome.interrupted:
        metrics["baselines"] = _baselines(stream, config, setup, collector, labels, metrics)
    enc = rt.encoder
    serve_s = outcome.serving_seconds
    metrics.update(
        {
            "labels_used": int(rt.labels_used),
            "frames_per_second": round(outcome.served / serve_s, 2) if serve_s > 0 else None,
            "serving_seconds": round(serve_s, 3),
            "paced_wait_seconds": round(outcome.slept_seconds, 3),
            "setup_seconds": round(setup.seconds, 3),
            "max_serving_gap_s": round(collector.max_gap_s, 4),
            "max_serving_gap_frame": collector.max_gap_frame,
            "peak_rss_mb": round(peak_rss_mb(), 1),
            "interrupted": outcome.interrupted,
            "adaptors": len(rt.domains),
            **event_counts(events),
            "backend": getattr(enc.backend, "name", type(enc.backend).__name__),
            "batch_size": int(config.encoder.batch_size),
            "scenario": stream.meta.get("name") if isinstance(stream.meta, dict) else None,
            "base_fit": strict_json(jsonable(setup.fit_report)),
        }
    )
    add_segment_counts(metrics["segments"], events)
    return metrics


def _baselines(
    stream: Stream,
    config: RuntimeConfig,
    setup: BaseSetup,
    collector: ServedCollector,
    labels: StreamLabels,
    metrics: dict[str, Any],
) -> dict[str, Any]:
    """The naive fine-tuning and joint baselines on the labels this run revealed (the one call
    site of :func:`edge_runtime.scoring.baseline_accuracies`)."""
    from edge_runtime.scoring import baseline_accuracies

    labelled = []
    for flag in labels.per_flag:
        keep = [k for k, i in enumerate(flag.indices) if collector.has_features(i)]
        if keep:
            idx = [flag.indices[k] for k in keep]
            y = np.asarray([flag.labels[k] for k in keep], np.int64)
            labelled.append((collector.features_of(idx), y))
    n = collector.served
    ok = ~collector.rejected[:n]
    assert collector.features is not None
    returns = metrics.get("return_segments")
    b = baseline_accuracies(
        setup.train_x,
        stream.train_labels,
        labelled,
        setup.eval_x,
        stream.eval_labels,
        stream.eval_segment,
        stream_x=collector.features[:n][ok],
        stream_labels=stream.labels[:n][ok],
        stream_segment=stream.segment[:n][ok],
        segment_is_shift=stream.segment_is_shift,
        returns=None if returns is None else {int(k): int(v) for k, v in returns.items()},
        steps=config.adapt.steps,
        lr=config.adapt.lr,
        schedule=config.adapt.lr_schedule,
        seed=config.hdc.seed,
    )
    mfa = metrics.get("mean_final_accuracy")
    if mfa is not None:
        b["gain_over_naive"] = round(mfa - b["naive_finetune_mean_final_accuracy"], 3)
        b["gap_to_joint"] = round(b["joint_mean_final_accuracy"] - mfa, 3)
    return b
