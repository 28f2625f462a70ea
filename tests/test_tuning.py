"""MetaSchedule (XGBoost cost model): records land in a JSON database, compile applies them, a corrupt log is
ignored with a warning. On x86 the MetaSchedule-tunable kernels of a model are its fp32 dense ones (the lm_head
here); the CPU bitplane kernel (kernels/lut_cpu.py, explicit loops) has one measured knob, rows per task per
bit-width (tune/bitplane.py, last tests); the s_tir bitplane kernel (GPU targets) is tuned directly below
(tune_kernel)."""
import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from tvm_anyprec.compiler import compile_model  # noqa: E402
from tvm_anyprec.kernels.anyprec import make_anyprec_linear  # noqa: E402
from tvm_anyprec.kernels.dense import make_dense_nt  # noqa: E402
from tvm_anyprec.quant import quantize_nonuniform  # noqa: E402
from tvm_anyprec.runtime import Session  # noqa: E402
from tvm_anyprec.targets import preset  # noqa: E402
from tvm_anyprec.tune import DB_FILES, count_records, open_database, query_database, tune_kernel  # noqa: E402

from tvm_anyprec.testing import MLP_DIMS, concat_luts, mlp_onnx as _mlp_onnx  # noqa: E402  (W1 is a [K=77, H=96] MatMul)

K, H = MLP_DIMS[:2]


def _records(log_dir) -> int:
    return sum(1 for line in (log_dir / DB_FILES[1]).read_text().splitlines() if line.strip())


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """`tune` on the graph's dense lm_head (M=3, N=33, K=33), 10 trials, SIGKILLed after its first batch of
    records (the worst case), a cut line appended as a kill mid-write would leave, then the same command
    again (resume) and once more (nothing left to do). Shared by the tests below."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from tvm_anyprec.tune import repair_log

    d = tmp_path_factory.mktemp("tune")
    _mlp_onnx(d / "mlp.onnx")
    log = d / "log"
    cmd = [sys.executable, "-m", "tvm_anyprec.cli", "tune", str(d / "mlp.onnx"), "--trials", "10",
           "--only", "m3_n33", "--log-dir", str(log),
           "--exclude", "lm_head"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + 300
    while not ((log / DB_FILES[1]).exists() and _records(log) >= 8):   # baseline + first batch written
        assert p.poll() is None, p.communicate()[1].decode()[-2000:]
        assert time.time() < deadline, "no records after 300 s"
        time.sleep(0.5)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    target = tvm.target.Target(preset("x86")["target"])
    f = make_dense_nt(3, 33, 33)
    repair_log(log)                                  # the kill itself may have cut a line
    first = count_records(open_database(log), f, target)
    with open(log / DB_FILES[1], "a") as fh:         # a record cut short by a kill
        fh.write('[0, [["main", "partial rec')
    resume = subprocess.run(cmd, capture_output=True, text=True)
    after_resume = count_records(open_database(log), f, target) if resume.returncode == 0 else None
    again = subprocess.run(cmd, capture_output=True, text=True)
    return d, f, target, {"first": first, "resume": resume, "after_resume": after_resume, "again": again}


def test_records_written_and_found(tuned):
    d, f, target, _ = tuned
    assert all((d / "log" / name).stat().st_size > 0 for name in DB_FILES)
    sched = query_database(open_database(d / "log"), f, target)
    assert sched is not None
    rng = np.random.default_rng(0)
    w = rng.standard_normal((33, 33)).astype(np.float32)
    x = rng.standard_normal((3, 33)).astype(np.float32)
    fn = tvm.compile(tvm.IRModule({"main": sched.with_attr("global_symbol", "main")}), target=target).jit()["main"]
    dev = tvm.cpu()
    y = tvm.runtime.empty((3, 33), "float32", dev)
    fn(tvm.runtime.tensor(x, dev), tvm.runtime.tensor(w, dev), y)
    np.testing.assert_allclose(y.numpy(), x @ w.T, rtol=1e-4, atol=1e-4)


def test_compile_applies_log_and_says_which(tuned, tmp_path):
    d, _f, _t, _ = tuned
    _mlp_onnx(tmp_path / "mlp.onnx")
    m = compile_model(tmp_path / "mlp.onnx", tmp_path / "art", tuning_log=d / "log")
    from tvm_anyprec.kernels.lut_cpu import cpu_isa
    from tvm_anyprec.schemes.anyprec import DEFAULT_ACCURACY
    from tvm_anyprec.targets import preset

    how = f"default:{DEFAULT_ACCURACY}/{cpu_isa(preset('x86')['target'])}"   # this CPU's bodies, default mode
    assert m["kernels"] == {f"anyprec_cpu_{how[8:].replace('/', '_')}_m3_n{n}_k{k}_b3to8": how
                            for n, k in ((96, 77), (50, 96), (33, 50))} | {"dense_nt_m3_n33_k33": "tuned"}
    plain = compile_model(tmp_path / "mlp.onnx", tmp_path / "art0", tuning_log=tmp_path / "none")
    assert not any(v.startswith("tuned") for v in plain["kernels"].values())
    x = np.random.default_rng(1).standard_normal((3, K)).astype(np.float32)
    a, b = Session(tmp_path / "art"), Session(tmp_path / "art0")
    for bits in (3, 6, 8):
        np.testing.assert_allclose(a.call("mlp", [x], bits).numpy(), b.call("mlp", [x], bits).numpy(),
                                   rtol=1e-4, atol=1e-5)


def test_corrupt_log_is_ignored_with_warning(tmp_path, capsys):
    _mlp_onnx(tmp_path / "mlp.onnx")
    log = tmp_path / "bad"
    log.mkdir()
    for name in DB_FILES:
        (log / name).write_text("{this is not json\n")
    m = compile_model(tmp_path / "mlp.onnx", tmp_path / "art", tuning_log=log)
    assert not any(v.startswith("tuned") for v in m["kernels"].values()) and m["tuning_log"] is None
    assert "warning: ignoring tuning log" in capsys.readouterr().err


# ------------------------------------------------------------------ model-level tuning: resume, RPC tracker
def test_tune_command_interrupt_and_resume(tuned):
    """`tune` killed (SIGKILL) after its first batch of records: the records survive, a line cut mid-write
    is dropped with a warning, the same command finishes the budget (only the missing trials), and a third
    run reuses everything."""
    d, f, target, run = tuned
    assert 1 <= run["first"] < 10
    r = run["resume"]
    assert r.returncode == 0, r.stderr[-2000:]
    assert "dropped 1 unreadable line" in r.stderr
    assert "trial" in r.stderr and "best" in r.stderr                  # the progress bar
    row = next(line for line in r.stdout.splitlines() if line.startswith("dense_nt_m3_n33"))
    assert int(row.split()[1]) == run["after_resume"] >= 10
    assert int(row.split()[2]) == run["after_resume"] - run["first"]   # only the missing trials ran
    again = run["again"]
    assert again.returncode == 0 and "(reused)" in again.stdout
    assert count_records(open_database(d / "log"), f, target) == run["after_resume"]


def test_tuning_through_rpc_tracker_with_two_servers(tmp_path):
    """TVM's RPC tracker and two RPC servers on loopback: the trials are measured on both servers, and the
    records are then applied by compile (and give the same numbers as the hand schedule)."""
    from tvm_anyprec.targets.remote import local_rpc_cluster
    from tvm_anyprec.tune import RPC

    _mlp_onnx(tmp_path / "mlp.onnx")
    target = tvm.target.Target(preset("x86")["target"])
    f = make_dense_nt(3, 33, 33)
    with local_rpc_cluster(2, key="anyprec-test", log_dir=tmp_path / "rpc") as (host, port, key, logs):
        tune_kernel(f, target, tmp_path / "log", trials=2, rpc=RPC(host, port, key, workers=2))
        loads = [lg.read_text().count("load_module") for lg in logs]
    assert all(n >= 1 for n in loads) and sum(loads) >= 2, loads       # both servers measured trials
    m = compile_model(tmp_path / "mlp.onnx", tmp_path / "art", tuning_log=tmp_path / "log")
    assert m["kernels"]["dense_nt_m3_n33_k33"] == "tuned"
    plain = compile_model(tmp_path / "mlp.onnx", tmp_path / "art0", tuning_log=tmp_path / "none")
    x = np.random.default_rng(2).standard_normal((3, K)).astype(np.float32)
    assert not any(v.startswith("tuned") for v in plain["kernels"].values())
    a, b = Session(tmp_path / "art"), Session(tmp_path / "art0")
    np.testing.assert_allclose(a.call("mlp", [x], 4).numpy(), b.call("mlp", [x], 4).numpy(), rtol=1e-4, atol=1e-5)


def test_tune_bad_arguments(tmp_path):
    from tvm_anyprec.cli import main

    _mlp_onnx(tmp_path / "mlp.onnx")
    assert main(["tune", str(tmp_path / "mlp.onnx"), "--trials", "0", "--log-dir", str(tmp_path / "l")]) == 2
    assert main(["tune", str(tmp_path / "mlp.onnx"), "--only", "nosuchkernel", "--log-dir", str(tmp_path / "l")]) == 2
    assert main(["tune", str(tmp_path / "mlp.onnx"), "--rpc-tracker", "nohostport", "--rpc-key", "k"]) == 2


def test_hand_schedule_is_the_first_record(tmp_path):
    """The tuner measures the hand schedule first and stores it as a record: the database's best is never a
    regression against compiling without a log."""
    from tvm_anyprec.schedules.cpu import schedule_linear_cpu
    from tvm_anyprec.tune import commit_hand_baseline, workload

    target = tvm.target.Target(preset("x86")["target"])
    f = make_anyprec_linear(2, 48, 64)
    db = open_database(tmp_path / "log")
    secs = commit_hand_baseline(db, f, target)
    assert secs is not None and secs > 0
    assert count_records(db, f, target) == 1
    best = query_database(open_database(tmp_path / "log"), f, target)
    tvm.ir.assert_structural_equal(workload(best)["main"], workload(schedule_linear_cpu(f))["main"])


# ------------------------------------------------------------------ the CPU bitplane kernel's rows per task

def test_bitplane_rows_measured_applied_and_exact(tmp_path, capsys):
    """`tune ARTIFACT` measures every rows-per-task candidate of the artifact's CPU bitplane kernels per bit-width
    and keeps the fastest (tuning_logs/<target>/bitplane_rows.json); compile applies the table (how =
    "tuned:rows=..."), and a forced non-default choice computes the same outputs as the default kernels, bit for
    bit (rows only regroup the parallel tasks). A corrupt table is ignored with a warning."""
    import json
    import subprocess
    import sys

    from tvm_anyprec.tune.bitplane import candidates
    from tvm_anyprec.tune.records import ROWS_FILE
    from tvm_anyprec.kernels.spec import spec_from_dict

    _mlp_onnx(tmp_path / "mlp.onnx")
    plain = compile_model(tmp_path / "mlp.onnx", tmp_path / "art0", tuning_log=tmp_path / "none")
    log = tmp_path / "log"
    r = subprocess.run([sys.executable, "-m", "tvm_anyprec.cli", "tune", str(tmp_path / "art0"), "--log-dir",
                        str(log)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    table = json.loads((log / ROWS_FILE).read_text())
    bitplane = {k: spec_from_dict(v) for k, v in plain["kernel_specs"].items() if v["family"] == "anyprec_cpu"}
    assert set(table) == set(bitplane) and len(bitplane) == 3
    for name, entry in table.items():
        cands = {str(c) for c in candidates(bitplane[name])}
        assert set(entry["rows"]) == {str(b) for b in range(3, 9)}
        for b, us in entry["us"].items():               # every candidate timed, the choice among them
            assert set(us) == cands and all(t > 0 for t in us.values())
            assert str(entry["rows"][b]) in cands
        assert name in r.stdout

    forced = {name: {**entry, "rows": {str(b): max(candidates(bitplane[name])) for b in range(3, 9)}}
              for name, entry in table.items()}
    only = tmp_path / "rows_only"      # no MetaSchedule records: the dense lm_head keeps art0's schedule
    only.mkdir()
    (only / ROWS_FILE).write_text(json.dumps(forced))
    m = compile_model(tmp_path / "mlp.onnx", tmp_path / "art", tuning_log=only)
    for name in bitplane:
        R = max(candidates(bitplane[name]))
        assert m["kernels"][name] == "tuned:rows=" + ",".join(f"{b}:{R}" for b in range(3, 9))
    x = np.random.default_rng(2).standard_normal((3, K)).astype(np.float32)
    a, b = Session(tmp_path / "art"), Session(tmp_path / "art0")
    for bits in range(3, 9):
        assert np.array_equal(a.call("mlp", [x], bits).numpy(), b.call("mlp", [x], bits).numpy()), bits

    (only / ROWS_FILE).write_text('{"anyprec_cpu_x": {"rows": {"3": 0}}}')
    capsys.readouterr()
    m = compile_model(tmp_path / "mlp.onnx", tmp_path / "art2", tuning_log=only)
    assert not any(v.startswith("tuned") for v in m["kernels"].values())
    assert f"warning: ignoring {only / ROWS_FILE}" in capsys.readouterr().err


@pytest.mark.unit
def test_bitplane_rows_choice_rules(tmp_path):
    """The default stays unless a candidate beats it by 3% (timing noise); kernels of an instruction set this
    CPU lacks, and presets of another architecture, are refused before anything runs."""
    from tvm_anyprec.errors import TuningError
    from tvm_anyprec.kernels.lut_cpu import AnyPrecCPU
    from tvm_anyprec.tune.bitplane import _choose, runs_on, tune_bitplane_rows

    assert _choose({1: 100.0, 2: 98.0}, 1) == 1 and _choose({1: 100.0, 2: 96.0}, 1) == 2
    assert _choose({1: 50.0, 2: 100.0}, 2) == 1
    assert runs_on("avx2", "avx512gfni") and runs_on("avx512", "avx512gfni") and runs_on("generic", "neon")
    assert not runs_on("avx512gfni", "avx2") and not runs_on("neon", "avx2") and not runs_on("avx2", "neon")
    assert runs_on("neon", "dotprod") and not runs_on("dotprod", "neon") and not runs_on("dotprod", "avx2")
    assert runs_on("dotprod", "i8mm") and not runs_on("i8mm", "dotprod")
    spec = AnyPrecCPU(1, 64, 256, 8, 3, "int8", "neon")
    with pytest.raises(TuningError, match="arm-neon"):
        tune_bitplane_rows({"k": spec}, "arm-neon", tmp_path, progress=False)
    with pytest.raises(TuningError, match="no CPU bitplane kernels"):
        tune_bitplane_rows({}, "x86", tmp_path, progress=False)
