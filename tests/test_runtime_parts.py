"""The runtime's rooms on their own and wired: planner budgets, the executor's worker (queue,
timeout, cancellation, failures), background adaptation through ``Runtime.process``, the thread
contract and the state codec.

Real encoder (MobileNetV2 at 32x32) and real Fashion-MNIST frames, small slices.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch
from small_runtime import fog_stream

from edge_runtime.adapt.adaptor import AdaptorArch
from edge_runtime.adapt.domains import DomainSet
from edge_runtime.adapt.executor import AdaptationExecutor
from edge_runtime.adapt.init import PrototypeInit, WeightedInitializer
from edge_runtime.adapt.jobs import JobFailed, TrainSet
from edge_runtime.adapt.planner import (
    EXTEND,
    GROW,
    KNOWN_DOMAIN,
    REFUSE,
    RETURN,
    AdaptationPlanner,
    Budgets,
    Plan,
)
from edge_runtime.adapt.search import FixedArchitecture, SearchResult
from edge_runtime.config import RuntimeConfig
from edge_runtime.drift.returns import AMBIGUOUS, CONFIRMED, ReturnDetector
from edge_runtime.errors import CheckpointError, InputError
from edge_runtime.labels import LabelProtocol, Shots, Trigger
from edge_runtime.runtime import Runtime, build_encoder, make_bank, make_registry

CFG = RuntimeConfig().with_overrides(
    {
        "encoder.input_size": 32,
        "encoder.batch_size": 32,
        "drift.warmup": 60,
        "drift.confirm_frames": 10,
        "adapt.label_budget": 48,
        "adapt.steps": 60,
    }
)


@pytest.fixture(scope="module")
def data() -> dict[str, np.ndarray]:
    return fog_stream(200)


@pytest.fixture(scope="module")
def encoder():
    return build_encoder(CFG)


@pytest.fixture(scope="module")
def feats(encoder, data) -> dict[str, np.ndarray]:
    return {
        "train": encoder.features(data["train_x"]),
        "stream": encoder.features(data["stream_x"]),
    }


def _domains(encoder, feats, data, cfg: RuntimeConfig = CFG) -> DomainSet:
    ds = DomainSet(make_bank(cfg, encoder.spec), make_registry(cfg))
    ex = _executor(background=False)
    built = ex.build_base(feats["train"], data["train_y"], ds.bank)
    ds.install_new(0, built.adaptor, built.bank, frame=-1, kind="base", origin="base")
    return ds


def _executor(**kw) -> AdaptationExecutor:
    kw.setdefault("search", FixedArchitecture())
    kw.setdefault("initializer", PrototypeInit())
    kw.setdefault("background", True)
    return AdaptationExecutor(steps=60, lr=1e-2, seed=0, **kw)


def _shots(x, y, kind: str = "domain_shift") -> Shots:
    return Shots(x, y, list(range(len(y))), Trigger(100, kind, {}))


# ------------------------------------------------------------------------------------ planner


def test_planner_checks_budgets_for_a_known_domain_claim_too(encoder, feats, data) -> None:
    """A known-domain claim used to skip the adaptor cap; its labels then grew a domain past it
    and RegistryFullError escaped process(). Now the claim is refused at the flag when the cap
    is reached, and a plan that would grow is refused again with the labels in."""
    ds = _domains(encoder, feats, data)
    budgets = Budgets.from_config(CFG.with_overrides({"adapt.max_adaptors": 1}), ds.bank.dim)
    planner = AdaptationPlanner(budgets)
    assert planner.admit(KNOWN_DOMAIN, ds).action == REFUSE
    assert "adapt.max_adaptors=1 reached" in planner.admit(KNOWN_DOMAIN, ds).reason
    fog = feats["stream"][160:208]
    rng = np.random.default_rng(0)
    wrong = rng.permutation(data["stream_y"][160:208])  # so the return test fails
    plan = planner.plan(_shots(fog, (wrong + 1) % 6, KNOWN_DOMAIN), ds, next_id=1)
    assert plan.action == REFUSE and "max_adaptors" in plan.reason


def test_planner_returns_grows_or_refuses_on_memory(encoder, feats, data) -> None:
    ds = _domains(encoder, feats, data)
    planner = AdaptationPlanner(Budgets.from_config(CFG, ds.bank.dim))
    clean = _shots(feats["stream"][:48], data["stream_y"][:48], KNOWN_DOMAIN)
    assert planner.plan(clean, ds, 1).action == RETURN
    fog = _shots(feats["stream"][160:208], data["stream_y"][160:208])
    assert planner.plan(fog, ds, 1).action == GROW
    tight = AdaptationPlanner(
        Budgets.from_config(CFG.with_overrides({"device.memory_budget_mb": 64}), ds.bank.dim)
    )
    plan = tight.plan(fog, ds, 1)
    assert plan.action == REFUSE and "device.memory_budget_mb=64" in plan.reason


# ------------------------------------------------------------------------------------ executor


class _BlockingSearch:
    """Blocks on the worker thread until released (a costly search's build runs there)."""

    name = "fixed"
    costly = True

    def __init__(self) -> None:
        self.release = threading.Event()
        self.entered = threading.Event()

    def search(self, inputs, labels, label_map, budget=None) -> SearchResult:
        x = inputs.get(None) if hasattr(inputs, "get") else inputs
        if threading.current_thread().name.startswith("edge-adapt"):
            self.entered.set()
            self.release.wait(20)
        return SearchResult(AdaptorArch("linear", x.shape[1]), self.name)


class _FailingInit(PrototypeInit):
    """Raises on its ``fail_at``-th call (0: the build's initialised head, 1: the training
    job's; None: every call)."""

    def __init__(self, fail_at: int | None) -> None:
        super().__init__()
        self.fail_at, self.calls = fail_at, 0

    def init(self, adaptor, features, labels) -> None:
        call, self.calls = self.calls, self.calls + 1
        if self.fail_at is None or call == self.fail_at:
            raise RuntimeError("init exploded")
        super().init(adaptor, features, labels)


def _train_set(feats, data) -> TrainSet:
    return TrainSet(feats["train"][:200], data["train_y"][:200], None)


class _WeightSeeingInit(PrototypeInit):
    """Records the row weights the executor hands a WeightedInitializer."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[np.ndarray | None] = []

    def init_weighted(self, adaptor, features, labels, sample_weight) -> None:
        self.seen.append(sample_weight)
        self.init(adaptor, features, labels)


def test_a_weighted_initializer_gets_the_rows_weights_and_a_plain_one_does_not(feats, data):
    w = np.linspace(1.0, 2.0, 200).astype(np.float32)
    train = TrainSet(feats["train"][:200], data["train_y"][:200], w)
    init = _WeightSeeingInit()
    assert isinstance(init, WeightedInitializer)
    assert not isinstance(PrototypeInit(), WeightedInitializer)
    ex = AdaptationExecutor(FixedArchitecture(), init, steps=5, lr=1e-2, seed=0)
    ex.train_head(train, 1, steps=0)
    assert len(init.seen) == 1 and init.seen[0] is w


def test_executor_timeout_and_cancel_are_reported_and_honoured(feats, data) -> None:
    search = _BlockingSearch()
    ex = _executor(search=search, timeout_s=0.2)
    ex.requeue([(3, _train_set(feats, data))])
    assert search.entered.wait(10)
    time.sleep(0.3)
    done = ex.poll()
    assert len(done) == 1 and isinstance(done[0], JobFailed) and "Timeout" in done[0].error
    search.release.set()
    ex.close(10)  # the late job sees the cancel event and its thread ends

    # Cancellation: the training loop sees the event between steps and stops early.
    ex = AdaptationExecutor(FixedArchitecture(), PrototypeInit(), steps=10**6, lr=1e-3, seed=0)
    ex.requeue([(4, _train_set(feats, data))])
    time.sleep(0.2)
    ex.cancel()
    assert ex.wait(10), "a cancelled job must end, not run its million steps"
    done = ex.poll()
    assert isinstance(done[0], JobFailed) and done[0].error == "cancelled"


def test_executor_failure_keeps_its_traceback_and_queues_the_next(feats, data, caplog) -> None:
    ex = _executor(initializer=_FailingInit(None))
    ex.requeue([(1, _train_set(feats, data)), (2, _train_set(feats, data))])
    assert ex.busy
    assert ex.wait(30)
    failed = ex.poll()
    ex.wait(30)
    failed += ex.poll()
    assert [(f.domain_id, f.where) for f in failed] == [(1, "train"), (2, "train")]
    assert "init exploded" in failed[0].error
    assert "Traceback" in caplog.text and "init exploded" in caplog.text


# ------------------------------------------------------------------------------------ runtime


def _serve(rt: Runtime, data, start: int, stop: int) -> list[dict]:
    events: list[dict] = []
    for a in range(start, stop, 32):
        b = min(a + 32, stop)
        idx = np.arange(a, b)
        dec = rt.process(data["stream_x"][a:b], idx)
        if dec.label_request.any():
            rt.feedback(idx[dec.label_request], data["stream_y"][idx[dec.label_request]])
        events += dec.events + rt.drain_events()
    return events


def test_background_adaptation_swaps_the_trained_head_without_waiting(encoder, data) -> None:
    search = _BlockingSearch()
    rt = Runtime(CFG, encoder, background=True, search=search)
    rt.fit_base(data["train_x"], data["train_y"])
    events = _serve(rt, data, 0, len(data["stream_x"]))
    types = [e["type"] for e in events]
    # The build (search, memory, initialised head) was blocked on the worker: serving went on
    # to the end of the stream without waiting for it, and nothing was installed yet.
    assert "adaptation_started" in types and "adaptation_finished" not in types
    assert search.entered.is_set() and rt.executor.busy and rt.executor.building
    assert sorted(rt.domains) == [0]
    search.release.set()
    assert rt.wait_idle(60)
    events = _serve(rt, data, 320, 352)
    types = [e["type"] for e in events]
    # Both phases finished while serving went on; they install in order at the next batch.
    assert types.index("adaptation_finished") < types.index("adaptor_trained")
    trained = [e for e in events if e["type"] == "adaptor_trained"]
    assert len(trained) == 1 and trained[0]["domain"] == 1 and trained[0]["train"]["steps"] > 0
    assert sorted(rt.domains) == [0, 1]
    rt.close()


@pytest.mark.parametrize("fail_at", [None, 1])
def test_failed_adaptation_is_an_error_event_and_serving_goes_on(
    encoder, data, fail_at: int | None
) -> None:
    """None: every build fails (no domain comes of any flag); 1: the build passes and its
    training job fails (the initialised head keeps serving)."""
    rt = Runtime(CFG, encoder, background=True, search=FixedArchitecture())
    rt.fit_base(data["train_x"], data["train_y"])  # the base head is built normally
    rt.executor.initializer = _FailingInit(fail_at)
    events = _serve(rt, data, 0, len(data["stream_x"]))
    rt.wait_idle(60)
    events += _serve(rt, data, 320, 360)
    errors = [e for e in events if e["type"] == "error"]
    assert errors and "init exploded" in errors[0]["message"]
    where = "adaptation:build" if fail_at is None else "adaptation:train"
    assert errors[0]["where"] == where
    # A training failure leaves the initialised head serving; a build failure no new domain.
    assert sorted(rt.domains) == ([0] if fail_at is None else [0, 1])
    assert not rt.adapting
    rt.close()


def test_thread_contract_commands_run_between_batches(encoder, data) -> None:
    rt = Runtime(CFG, encoder, background=False)
    rt.fit_base(data["train_x"], data["train_y"])
    rt.process(data["stream_x"][:32])
    result: dict = {}

    def other_thread() -> None:
        try:
            rt.process(data["stream_x"][32:64])
        except InputError as exc:
            result["error"] = str(exc)
        result["state"] = rt.commands.submit("report_state")
        result["adapt"] = rt.commands.submit("adapt_now", kind="novel_class")

    t = threading.Thread(target=other_thread)
    t.start()
    t.join(10)
    assert "owned by another thread" in result["error"]
    assert not result["state"].done()  # nothing runs until the owner drains the queue
    with pytest.raises(InputError, match="unknown command"):
        rt.commands.submit("format_disk")
    dec = rt.process(data["stream_x"][32:64])
    assert result["state"].result(0)["domains"][0]["id"] == 0
    assert result["adapt"].result(0) == {"collecting": CFG.adapt.label_budget}
    assert [e["type"] for e in dec.events][:3] == ["novel_class", "alert", "labels_requested"]
    assert dec.label_request.all()
    # A refused command reaches its future and the event log, and serving goes on.
    bad = rt.commands.submit("rollback", domain=0)
    dec = rt.process(data["stream_x"][64:96])
    with pytest.raises(InputError, match="no earlier adaptor version"):
        bad.result(0)
    assert "command_refused" in [e["type"] for e in dec.events]


# ------------------------------------------------------------------------------------ returns


def test_return_detector_confirms_dismisses_or_calls_it_ambiguous() -> None:
    def run(claims: list[int]) -> object:
        det = ReturnDetector(false_alarm_rate=1e-3, confirm_frames=10)
        out = None
        for i, d in enumerate(claims):
            # d >= 0: the active domain (1) rejects the frame and domain d claims it
            out = det.update(i, 1, d if d >= 0 else 1, False, -1.0 if d >= 0 else 0.5) or out
        return out

    quiet = [-1] * 200
    assert run(quiet) is None
    back = run(quiet + [0] * 40)
    assert back.case == CONFIRMED and back.domain == 0 and back.evidence["routed_away_rate"] == 1.0
    split = run(quiet + [0, 2] * 20)  # no domain wins a majority: labels decide
    assert split.case == AMBIGUOUS and split.evidence["top_share"] == 0.5
    weak = run(quiet + [0, 0, 0, -1, -1, -1, -1] * 6)  # away at 3 in 7: not a clear return
    assert weak.case == AMBIGUOUS
    burst = ReturnDetector(false_alarm_rate=1e-3, confirm_frames=10)
    for i, d in enumerate(quiet + [0] * 4 + [-1] * 40):
        assert burst.update(i, 1, d if d >= 0 else 1, False, -1.0 if d >= 0 else 0.5) is None
    assert burst.n_dismissed == 1


# ------------------------------------------------------------------------------------ state


def test_label_protocol_spends_at_most_the_budget_and_round_trips() -> None:
    lp = LabelProtocol(budget=3, feature_dim=4)
    lp.start(Trigger(7, "domain_shift", {"x": 1}))
    asked = [i for i in range(10, 16) if lp.request(i, np.full(4, i, np.float32))]
    assert asked == [10, 11, 12]
    assert lp.feedback([10, 13, 14], [1, 2, 3]) == 1  # frames never asked for are ignored
    clone = LabelProtocol(budget=1, feature_dim=4)
    clone.load_state_dict(lp.state_dict())
    assert clone.summary() == lp.summary()
    clone.feedback([11, 12], [4, 5])
    shots = clone.take()
    assert shots is not None and shots.frames == [10, 11, 12] and shots.labels.tolist() == [1, 4, 5]
    assert shots.trigger == Trigger(7, "domain_shift", {"x": 1}) and not clone.collecting
    with pytest.raises(InputError, match="integers"):
        lp.feedback([11], [1.5])


def test_checkpoint_keeps_the_monitor_window_and_refuses_other_plug_points(
    encoder, data, tmp_path
) -> None:
    rt = Runtime(CFG, encoder, background=False)
    rt.fit_base(data["train_x"], data["train_y"])
    _serve(rt, data, 0, 128)
    path = rt.save(tmp_path / "ck")
    clone = Runtime.load(path, encoder, background=False)
    ours, theirs = rt.monitor.state_dict()["recent"], clone.monitor.state_dict()["recent"]
    assert len(ours["frames"]) == rt.monitor.window
    for key in ("frames", "ood", "score", "extras"):
        np.testing.assert_array_equal(ours[key], theirs[key])

    class OtherSearch(FixedArchitecture):
        name = "zero-shot-nas"

    with pytest.raises(CheckpointError, match="search 'zero-shot'"):
        Runtime.load(path, encoder, background=False, search=OtherSearch())


def test_the_bank_scores_on_the_encoders_device(encoder) -> None:
    """The bank used to be built for the CPU whatever the encoder ran on, so a GPU device never
    reached the CUDA or Triton kernels. Now it is built for the encoder's device: on this
    machine a CUDA encoder is refused by name, as the bank cannot score there."""
    from edge_runtime.encoder import Encoder
    from edge_runtime.errors import BackendUnavailableError

    class OnCuda:
        device = "cuda"
        spec = encoder.spec
        name = "claims-cuda"

        def encode(self, batch):
            return encoder.backend.encode(batch)

    assert Runtime(CFG, encoder).bank.device is None  # CPU: numpy straight to the C++ path
    if torch.cuda.is_available():
        assert Runtime(CFG, Encoder(OnCuda())).bank.device.type == "cuda"
    else:
        with pytest.raises(BackendUnavailableError, match="cuda"):
            Runtime(CFG, Encoder(OnCuda()))


def test_a_grown_domain_takes_the_meta_learned_threshold_correction(encoder, feats, data) -> None:
    """With a correction (a meta-init's detector side), a grown domain's OOD threshold is the
    corrected one, reported beside the bank's; an extended domain keeps the bank's."""
    from edge_runtime.meta.detector import FEATURES, ThresholdCorrection

    fog = _shots(feats["stream"][160:208], data["stream_y"][160:208])
    plain = _executor(background=False)
    ds = _domains(encoder, feats, data)
    plain.execute(Plan(GROW, 1), fog, ds)
    (built_plain,) = plain.poll()
    assert "threshold_bank" not in built_plain.report
    coef = np.zeros(len(FEATURES))
    coef[2] = -0.5  # half a standard deviation of the shots' scores below the bank's value
    corrected = _executor(background=False, correction=ThresholdCorrection(coef=coef))
    corrected.execute(Plan(GROW, 1), fog, _domains(encoder, feats, data))
    (built,) = corrected.poll()
    t_bank, t = built.report["threshold_bank"], built.report["threshold"]
    assert t_bank == pytest.approx(built_plain.report["threshold"])
    assert t < t_bank
    assert built.bank.thresholds[built.bank.domain_ids.index(1)] == pytest.approx(t)
    # Extending the base with the same rows: the bank's own threshold, no correction.
    corrected.execute(Plan(EXTEND, 0), fog, _domains(encoder, feats, data))
    (ext,) = corrected.poll()
    assert "threshold_bank" not in ext.report
