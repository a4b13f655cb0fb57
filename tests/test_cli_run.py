"""`edge-runtime run` end to end on fashion-drift-mini, bad inputs, and Ctrl-C."""

from __future__ import annotations

import argparse
import json
import os
import signal

import numpy as np
import pytest
from run_args import FAST_RUN_ARGS

from edge_runtime import cli
from edge_runtime.cli.demo import cached_scenario
from edge_runtime.data import load_stream

FAST = FAST_RUN_ARGS
METRIC_KEYS = {
    "prequential_accuracy",
    "false_alarms",
    "ood_auroc",
    "ood_fpr95",
    "forgetting",
    "labels_used",
    "frames_per_second",
    "peak_rss_mb",
    "max_serving_gap_s",
    "segments",
    "interrupted",
}
SEGMENT_KEYS = {
    "id",
    "frames",
    "is_shift",
    "detected",
    "detection_delay",
    "prequential_accuracy",
    "final_accuracy",
    "adaptor",
}


def _main(argv: list[str]) -> int:
    # No fallback: a subcommand module that does not import must fail these tests.
    return cli.main(argv)


def test_every_subcommand_registers() -> None:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(cli.COMMANDS) <= set(sub.choices)
    assert {"demo", "run", "scenario", "export", "profile"} <= set(cli.COMMANDS)


@pytest.fixture(scope="module")
def mini() -> str:
    return str(cached_scenario("fashion-drift-mini"))


def test_run_mini_end_to_end(mini, tmp_path) -> None:
    out = tmp_path / "run"
    assert _main(["run", "--stream", mini, "--out", str(out), *FAST]) == 0
    m = json.loads((out / "metrics.json").read_text())
    stream = load_stream(mini)
    assert set(m) >= METRIC_KEYS and not m["interrupted"]
    assert m["frames_served"] == len(stream) == 1140
    assert len(m["segments"]) == 6 and all(set(s) >= SEGMENT_KEYS for s in m["segments"])
    # The first shift (fog) is detected within the segment, and quickly.
    fog = m["segments"][1]
    assert fog["detected"] and fog["detection_delay"] <= 100
    assert m["segments"][0]["prequential_accuracy"] > 60
    flags = m["drift_flags"]
    assert 0 < m["labels_used"] <= 40 * flags and all(v <= 40 for v in m["labels_per_drift"])
    assert m["adaptors"] >= 2 and m["frames_per_second"] > 0 and m["peak_rss_mb"] > 0
    assert 0.5 <= m["ood_auroc"] <= 1.0
    frames = np.load(out / "frames.npz")
    assert frames["prediction"].shape == (1140,) and frames["prediction"].dtype == np.int64
    assert frames["ood_score"].dtype == np.float32 and frames["is_ood"].dtype == bool
    assert frames["eval_prediction"].shape == (len(stream.eval_labels),)
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    assert all({"type", "frame", "time"} <= set(e) for e in events)
    types = {e["type"] for e in events}
    assert {"drift", "alert", "adaptation_started", "adaptation_finished"} <= types


def test_bad_stream_and_config_give_one_line_errors(mini, tmp_path, capsys) -> None:
    stream = load_stream(mini)
    arrays = stream.arrays()
    arrays["labels"] = arrays["labels"].astype(np.float32)
    bad = tmp_path / "bad.npz"
    np.savez(bad, **arrays)
    assert _main(["run", "--stream", str(bad), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    assert "labels" in capsys.readouterr().err
    arrays = stream.arrays()
    arrays["segment"] = arrays["segment"][:-3]
    np.savez(bad, **arrays)
    assert _main(["run", "--stream", str(bad), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    assert "segment" in capsys.readouterr().err
    cfg = tmp_path / "c.yaml"
    cfg.write_text("adapt: [unclosed\n")
    assert _main(["run", "--stream", mini, "--config", str(cfg), "--out", str(tmp_path / "o")]) == 2
    assert "c.yaml" in capsys.readouterr().err
    assert (
        _main(["run", "--stream", mini, "--out", str(tmp_path / "o"), "--set", "adapt.nope=1"]) == 2
    )


def test_ctrl_c_writes_partial_outputs(mini, tmp_path) -> None:
    from edge_runtime.cli.run import resolve_config
    from edge_runtime.runner import run_stream

    parser_args = type(
        "A",
        (),
        {
            "config": None,
            "profile": None,
            "label_budget": 40,
            "overrides": ["encoder.input_size=32", "hdc.dim=2048"],
        },
    )
    cfg = resolve_config(parser_args)
    stream = load_stream(mini)

    def interrupt(served: int, rt) -> None:
        if served >= 96:
            os.kill(os.getpid(), signal.SIGINT)

    res = run_stream(stream, cfg, tmp_path / "o", progress=False, on_batch=interrupt)
    assert res.interrupted and res.metrics["interrupted"] is True
    assert res.metrics["frames_served"] == 96
    assert np.load(tmp_path / "o" / "frames.npz")["prediction"].shape == (96,)


def test_run_and_demo_help_document_rate(capsys) -> None:
    for command in ("run", "demo"):
        with pytest.raises(SystemExit) as exc:
            cli.main([command, "--help"])
        assert exc.value.code == 0
        text = " ".join(capsys.readouterr().out.split())
        assert "--rate FPS" in text and "--max-frames N" in text
        assert "as fast as" in text and "adaptation_delay_frames" in text


def test_run_rejects_bad_rate_and_max_frames(mini, tmp_path, capsys) -> None:
    base = ["run", "--stream", mini, "--out", str(tmp_path / "o"), "--no-progress"]
    for bad in (["--rate", "0"], ["--rate", "-3"], ["--rate", "nan"], ["--max-frames", "0"]):
        with pytest.raises(SystemExit) as exc:
            cli.main([*base, *bad])
        assert exc.value.code == 2
        assert bad[0] in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
