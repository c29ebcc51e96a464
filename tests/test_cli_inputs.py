"""Careless input (issue 15): an output that would overwrite an input, a bad option value or a bad
recipe value is refused before any work with one ``error:`` line and exit 1, and nothing in the
working directory is written or changed; Ctrl-C ends with ``error: interrupted``."""

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import EX_CKPT, EX_TOKENIZER, cli, one_line_error
from pgolf_pack.calib.hessian import save_hessians
from pgolf_pack.calib.shards import write_shard

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def ws(tmp_path, ckpt_path):
    """Every kind of input a command reads, as real files in one directory (hashed by each test)."""
    rng = np.random.default_rng(0)
    for i in range(2):
        write_shard(tmp_path / f"tok_{i}.bin", rng.integers(0, 256, 3000))
    save_hessians(tmp_path / "H.safetensors", {"blocks.0.mlp.fc.weight": np.eye(64, dtype=np.float32)},
                  {"blocks.0.mlp.fc.weight": 64})
    (tmp_path / "r.toml").write_text("[default]\nbits = 5\n")
    (tmp_path / "s.json").write_text('{"blocks.*": 1.0}\n')
    shutil.copy(EX_TOKENIZER, tmp_path / "sp.model")
    shutil.copy(ROOT / "tests" / "models" / "train_gpt.py", tmp_path / "m.py")
    (tmp_path / "outdir").mkdir()
    os.symlink(ckpt_path, tmp_path / "link.safetensors")
    os.link(ckpt_path, tmp_path / "hard.safetensors")
    return tmp_path


def _fill(args, ws: Path) -> list[str]:
    names = {"CKPT": "model.safetensors", "H": "H.safetensors", "T0": "tok_0.bin", "T1": "tok_1.bin",
             "TGLOB": "tok_*.bin", "R": "r.toml", "S": "s.json", "TOK": "sp.model", "M": "m.py", "ART": "a.pgp",
             "DIR": "outdir", "LINK": "link.safetensors", "HARD": "hard.safetensors", "NEW": "new.out",
             "MISSING": "nodir/x.out"}
    return [str(ws / names[a]) if a in names else str(a) for a in args]


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def refused(ws: Path, args, text: str = "") -> None:
    """``args`` fails as a user error and leaves every file under ``ws`` as it was, with none added."""
    before = _snapshot(ws)
    r = cli(*_fill(args, ws))
    one_line_error(r, text)
    assert r.output.count("\n") == 1, repr(r.output)  # not even a blank line from a progress display
    assert _snapshot(ws) == before


CAL = ("calibrate", "CKPT", "--tokens", "TGLOB")
SENS = ("sensitivity", "CKPT", "--hessians", "H", "--tokens", "TGLOB")
RD = ("analyze", "rd", "CKPT", "--hessians", "H")
EVAL = ("eval", "CKPT", "--tokens", "TGLOB", "--tokenizer", "TOK")

OVERWRITES = {
    "quantize -o CKPT": (("quantize", "CKPT", "-o", "CKPT"), "refusing to overwrite"),
    "quantize -o symlink to CKPT": (("quantize", "CKPT", "-o", "LINK"), "refusing to overwrite"),
    "quantize -o hard link of CKPT": (("quantize", "CKPT", "-o", "HARD"), "refusing to overwrite"),
    "quantize --hessians H -o H": (("quantize", "CKPT", "-o", "H", "--method", "gptq", "--hessians", "H"),
                                   "refusing to overwrite"),
    "quantize --recipe R -o R": (("quantize", "CKPT", "-o", "R", "--recipe", "R"), "refusing to overwrite"),
    "quantize --sensitivity S -o S": (("quantize", "CKPT", "-o", "S", "--method", "ecsq", "--lam", "0.1",
                                       "--sensitivity", "S"), "refusing to overwrite"),
    "quantize --budget --save-recipe CKPT": (("quantize", "CKPT", "-o", "NEW", "--budget", 9000, "--save-recipe",
                                              "CKPT"), "refusing to overwrite"),
    "quantize --budget --save-recipe = -o": (("quantize", "CKPT", "-o", "NEW", "--budget", 9000, "--save-recipe",
                                              "NEW"), "refusing to overwrite"),
    "quantize --row-bits --tokens T -o T": (("quantize", "CKPT", "-o", "T0", "--row-bits", "10%:8,rest:6",
                                             "--tokens", "TGLOB"), "refusing to overwrite"),
    "quantize -o DIR": (("quantize", "CKPT", "-o", "DIR"), "existing directory"),
    "quantize -o missing dir": (("quantize", "CKPT", "-o", "MISSING"), "does not exist"),
    "calibrate --tokens glob -o 2nd shard": ((*CAL, "-o", "T1"), "refusing to overwrite"),
    "calibrate -o CKPT": ((*CAL, "-o", "CKPT"), "refusing to overwrite"),
    "calibrate --model M -o M": ((*CAL, "--model", "M", "-o", "M"), "refusing to overwrite"),
    "calibrate -o DIR": ((*CAL, "-o", "DIR"), "existing directory"),
    "calibrate -o missing dir": ((*CAL, "-o", "MISSING"), "does not exist"),
    "sensitivity -o H": ((*SENS, "-o", "H"), "refusing to overwrite"),
    "sensitivity -o shard": ((*SENS, "-o", "T0"), "refusing to overwrite"),
    "sensitivity -o CKPT": ((*SENS, "-o", "CKPT"), "refusing to overwrite"),
    "sensitivity -o DIR": ((*SENS, "-o", "DIR"), "existing directory"),
    "unpack -o ART": (("unpack", "ART", "-o", "ART"), "refusing to overwrite"),
    "unpack -o DIR": (("unpack", "ART", "-o", "DIR"), "existing directory"),
    "analyze size --csv input": (("analyze", "size", "CKPT", "--csv", "CKPT"), "refusing to overwrite"),
    "analyze size --csv recipe": (("analyze", "size", "CKPT", "--recipe", "R", "--csv", "R"), "refusing to overwrite"),
    "analyze size --csv DIR": (("analyze", "size", "CKPT", "--csv", "DIR"), "existing directory"),
    "analyze rms --plot input": (("analyze", "rms", "CKPT", "--plot", "CKPT"), "refusing to overwrite"),
    "analyze rms --plot missing dir": (("analyze", "rms", "CKPT", "--plot", "MISSING"), "does not exist"),
    "analyze rd --plot H": ((*RD, "--tokens", "TGLOB", "--tokenizer", "TOK", "--plot", "H"), "refusing to overwrite"),
    "analyze rd --plot tokenizer": ((*RD, "--tokens", "TGLOB", "--tokenizer", "TOK", "--plot", "TOK"),
                                    "refusing to overwrite"),
}


@pytest.mark.parametrize("case", list(OVERWRITES))
def test_an_output_never_overwrites_an_input(ws, case):
    args, text = OVERWRITES[case]
    if "ART" in args:
        assert cli(*_fill(("quantize", "CKPT", "-o", "ART", "--codec", "zstd"), ws)).exit_code == 0
    refused(ws, args, text)


def _readable_by_all(path: Path) -> bool:
    return all(p.stat().st_mode & 0o005 == 0o005 for p in (path, *path.parents))


def test_an_unwritable_output_directory_is_refused_before_work(ws):
    if os.geteuid() != 0:
        ro = ws / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        try:
            refused(ws, ("quantize", "CKPT", "-o", ro / "x.pgp"), "not writable")
            refused(ws, (*CAL, "-o", ro / "H2.safetensors"), "not writable")
        finally:
            ro.chmod(0o755)
        return
    # Root writes through a read-only mode, so there is nothing to refuse: run the command as
    # nobody instead, where the system lets us.
    if shutil.which("setpriv") is None or not (_readable_by_all(ROOT) and _readable_by_all(Path(sys.executable).parent)):
        pytest.skip("running as root without setpriv or a world-readable checkout: a read-only mode stops no write")
    import tempfile

    top = Path(tempfile.mkdtemp(prefix="pgolf-ro-"))
    try:
        top.chmod(0o777)
        shutil.copy(ws / "model.safetensors", top / "m.safetensors")
        (top / "m.safetensors").chmod(0o644)
        (top / "ro").mkdir(mode=0o555)
        (top / "ro").chmod(0o555)
        env = {**os.environ, "PYTHONPATH": str(ROOT), "HOME": str(top), "NUMBA_CACHE_DIR": str(top / "numba")}
        r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-m",
                            "pgolf_pack.cli", "quantize", "m.safetensors", "-o", "ro/x.pgp"], cwd=top, env=env,
                           capture_output=True, text=True, timeout=120)
        assert (r.returncode, r.stdout, r.stderr) == (1, "", "error: output directory is not writable: ro\n")
        assert not list((top / "ro").iterdir())
    finally:
        shutil.rmtree(top)


BAD_OPTIONS = {
    "quantize --bits 0": (("quantize", "CKPT", "-o", "NEW", "--bits", 0), "--bits"),
    "quantize --bits 9": (("quantize", "CKPT", "-o", "NEW", "--bits", 9), "--bits"),
    "quantize --bits six": (("quantize", "CKPT", "-o", "NEW", "--bits", "six"), "--bits"),
    "quantize --embed-bits 1": (("quantize", "CKPT", "-o", "NEW", "--embed-bits", 1), "--embed-bits"),
    "quantize --clip banana": (("quantize", "CKPT", "-o", "NEW", "--clip", "banana"), "unknown clip"),
    "quantize --clip banana --budget": (("quantize", "CKPT", "-o", "NEW", "--clip", "banana", "--budget", 9000),
                                        "unknown clip"),
    "quantize --method banana": (("quantize", "CKPT", "-o", "NEW", "--method", "banana"), "unknown method"),
    "quantize --sigmas nan": (("quantize", "CKPT", "-o", "NEW", "--sigmas", "nan"), "--sigmas"),
    "quantize --sigmas -2": (("quantize", "CKPT", "-o", "NEW", "--sigmas", -2), "--sigmas"),
    "quantize --sigmas 0": (("quantize", "CKPT", "-o", "NEW", "--sigmas", 0), "--sigmas"),
    "quantize --embed-sigmas inf": (("quantize", "CKPT", "-o", "NEW", "--embed-sigmas", "inf"), "--embed-sigmas"),
    "quantize --min-numel -1": (("quantize", "CKPT", "-o", "NEW", "--min-numel", -1), "--min-numel"),
    "quantize --lqer-top-k -1": (("quantize", "CKPT", "-o", "NEW", "--lqer-top-k", -1), "--lqer-top-k"),
    "quantize --lqer-rank 0": (("quantize", "CKPT", "-o", "NEW", "--lqer-top-k", 1, "--lqer-rank", 0), "--lqer-rank"),
    "quantize --lqer-bits 9": (("quantize", "CKPT", "-o", "NEW", "--lqer-top-k", 1, "--lqer-bits", 9), "--lqer-bits"),
    "quantize --lqer-group 0": (("quantize", "CKPT", "-o", "NEW", "--lqer-top-k", 1, "--lqer-group", 0),
                                "--lqer-group"),
    "quantize --lqer-weighted banana": (("quantize", "CKPT", "-o", "NEW", "--lqer-top-k", 1, "--lqer-weighted",
                                         "banana"), "--lqer-weighted"),
    "quantize --budget 0": (("quantize", "CKPT", "-o", "NEW", "--budget", 0), "--budget"),
    "quantize --budget -5": (("quantize", "CKPT", "-o", "NEW", "--budget", -5), "--budget"),
    "quantize --lam nan": (("quantize", "CKPT", "-o", "NEW", "--method", "ecsq", "--lam", "nan"), "--lam"),
    "quantize --lam -1": (("quantize", "CKPT", "-o", "NEW", "--method", "ecsq", "--lam", -1), "--lam"),
    "quantize --codec banana": (("quantize", "CKPT", "-o", "NEW", "--codec", "banana"), "banana"),
    "quantize --row-bits banana": (("quantize", "CKPT", "-o", "NEW", "--row-bits", "banana"), "row"),
    "quantize without -o": (("quantize", "CKPT"), "--output"),
    "quantize --no-such-flag": (("quantize", "CKPT", "-o", "NEW", "--no-such-flag"), "--no-such-flag"),
    "no such command": (("quantise", "CKPT"), "quantise"),
    "eval --seq-len 0": ((*EVAL, "--seq-len", 0), "--seq-len"),
    "eval --batch 0": ((*EVAL, "--batch", 0), "--batch"),
    "eval --max-seqs 0": ((*EVAL, "--max-seqs", 0), "--max-seqs"),
    "eval --device tpu": ((*EVAL, "--device", "tpu"), "--device"),
    "calibrate --seqs 0": ((*CAL, "-o", "NEW", "--seqs", 0), "--seqs"),
    "calibrate --seqs -3": ((*CAL, "-o", "NEW", "--seqs", -3), "--seqs"),
    "calibrate --seq-len 1": ((*CAL, "-o", "NEW", "--seq-len", 1), "--seq-len"),
    "calibrate --batch 0": ((*CAL, "-o", "NEW", "--batch", 0), "--batch"),
    "calibrate --num-heads 0": ((*CAL, "-o", "NEW", "--num-heads", 0), "--num-heads"),
    "calibrate --device tpu": ((*CAL, "-o", "NEW", "--device", "tpu"), "--device"),
    "calibrate --seed -1": ((*CAL, "-o", "NEW", "--seed", -1), "--seed"),
    "sensitivity --seqs 0": ((*SENS, "-o", "NEW", "--seqs", 0), "--seqs"),
    "sensitivity --seq-len 1": ((*SENS, "-o", "NEW", "--seq-len", 1), "--seq-len"),
    "sensitivity --min-numel -1": ((*SENS, "-o", "NEW", "--min-numel", -1), "--min-numel"),
    "sensitivity --device tpu": ((*SENS, "-o", "NEW", "--device", "tpu"), "--device"),
    "sensitivity --seed -1": ((*SENS, "-o", "NEW", "--seed", -1), "--seed"),
    "analyze size --bits 9": (("analyze", "size", "CKPT", "--bits", 9), "--bits"),
    "analyze size --top 0": (("analyze", "size", "CKPT", "--top", 0), "--top"),
    "analyze size --sigmas nan": (("analyze", "size", "CKPT", "--sigmas", "nan"), "sigmas"),
    "analyze size --min-numel -1": (("analyze", "size", "CKPT", "--min-numel", -1), "min_numel"),
    "analyze rms --sigmas nan": (("analyze", "rms", "CKPT", "--sigmas", "nan"), "--sigmas"),
    "analyze rms --sigmas -2": (("analyze", "rms", "CKPT", "--sigmas", -2), "--sigmas"),
    "analyze rms --bits 1": (("analyze", "rms", "CKPT", "--bits", 1), "--bits"),
    "analyze rd --points 0": ((*RD, "--points", 0), "--points"),
    "analyze rd --seq-len 0": ((*RD, "--seq-len", 0), "--seq-len"),
    "analyze rd --max-seqs 0": ((*RD, "--max-seqs", 0), "--max-seqs"),
    "analyze rd --lambda-span 0": ((*RD, "--lambda-span", 0), "--lambda-span"),
    "analyze rd --col-beta nan": ((*RD, "--col-beta", "nan"), "--col-beta"),
    "analyze rd --device tpu": ((*RD, "--device", "tpu"), "--device"),
    "analyze rd --lambdas inf": ((*RD, "--lambdas", "inf"), "--lambdas"),
    "analyze rd --pipelines ''": ((*RD, "--pipelines", ""), "--pipelines"),
}


@pytest.mark.parametrize("case", list(BAD_OPTIONS))
def test_a_bad_option_value_is_one_error_line(ws, case):
    args, text = BAD_OPTIONS[case]
    refused(ws, args, text)


# Recipe files: (file name, content) -> text of the error.
BAD_RECIPES = {
    "binary": ("bin.toml", bytes(range(256)) * 4, "not a text file"),
    "not TOML": ("bad.toml", b"[default\nbits = 5\n", "cannot parse"),
    "JSON list": ("list.json", b"[1, 2]", "must be a table"),
    "JSON null": ("null.json", b"null", "must be a table"),
    "JSON string": ("str.json", b'"rtn"', "must be a table"),
    "default = 5": ("d.toml", b"default = 5\n", "[default] must be a table"),
    "rule = 5": ("r5.toml", b"rule = 5\n", "'rule' must be a list"),
    "rule = [5]": ("r5l.toml", b"rule = [5]\n", "rule 1 must be a table"),
    "rule match = 5": ("rm.toml", b"[[rule]]\nmatch = 5\nbits = 4\n", "match must be"),
    "min_numel = 'abc'": ("mn.toml", b'min_numel = "abc"\n', "min_numel"),
    "min_numel = -1": ("mn2.toml", b"min_numel = -1\n", "min_numel"),
    "passthrough = 5": ("pt.toml", b"passthrough = 5\n", "passthrough"),
    "clip = 'banana'": ("c.toml", b'[default]\nclip = "banana"\n', "unknown clip"),
    "clip = ['a']": ("cl.toml", b'[default]\nclip = ["a"]\n', "unknown clip"),
    "top-level clip": ("tc.toml", b'clip = "banana"\n', "unknown top-level key"),
    "method = 5": ("m.toml", b"[default]\nmethod = 5\n", "unknown method"),
    "sigmas = -3": ("s3.toml", b"[default]\nsigmas = -3\n", "sigmas"),
    "sigmas = 0": ("s0.toml", b"[default]\nsigmas = 0\n", "sigmas"),
    "sigmas = nan": ("sn.toml", b"[default]\nsigmas = nan\n", "sigmas"),
    "sigmas = 'wide'": ("sw.toml", b'[default]\nsigmas = "wide"\n', "sigmas"),
    "rule sigmas = -3": ("rs.toml", b'[[rule]]\nmatch = "*emb*"\nsigmas = -3\n', "sigmas"),
    "bits = 'six'": ("b6.toml", b'[default]\nbits = "six"\n', "bits"),
    "bits = true": ("bt.toml", b"[default]\nbits = true\n", "bits"),
    "bits = 6.5": ("bf.toml", b"[default]\nbits = 6.5\n", "bits"),
    "block_size = 0": ("bs.toml", b'[default]\nmethod = "gptq"\nblock_size = 0\n', "block_size"),
    "damp = -1": ("dp.toml", b'[default]\nmethod = "gptq"\ndamp = -1\n', "damp"),
    "act_order = 'yes'": ("ao.toml", b'[default]\nmethod = "gptq"\nact_order = "yes"\n', "act_order"),
    "delta = 0": ("de.toml", b'[default]\nmethod = "ecsq"\ndelta = 0\n', "delta"),
    "row_mode = 'x'": ("rmo.toml", b'[default]\nmethod = "ecsq"\nrow_mode = "x"\n', "row_mode"),
    "coding = 'x'": ("co.toml", b'[default]\nmethod = "trellis"\ncoding = "x"\n', "coding"),
    "iters = 0": ("it.toml", b'[default]\nmethod = "ecsq"\niters = 0\n', "iters"),
    "lqer_rank = 0": ("lr.toml", b'[[rule]]\nmatch = "*fc*"\nlqer_rank = 0\n', "lqer_rank"),
    "lqer_weighted = 'x'": ("lw.toml", b'[[rule]]\nmatch = "*fc*"\nlqer_rank = 2\nlqer_weighted = "x"\n',
                            "lqer_weighted"),
    "row_bits = 5": ("rb.toml", b'[[rule]]\nmatch = "*emb*"\nrow_bits = 5\n', "row_bits"),
    "group = 5": ("g.toml", b"[default]\ngroup = 5\n", "group"),
}


@pytest.mark.parametrize("case", list(BAD_RECIPES))
def test_a_bad_recipe_is_one_error_line(ws, case):
    name, content, text = BAD_RECIPES[case]
    (ws / name).write_bytes(content)
    refused(ws, ("quantize", "CKPT", "-o", "NEW", "--recipe", ws / name), text)
    refused(ws, ("analyze", "size", "CKPT", "--recipe", ws / name), text)


def test_good_values_next_to_the_bad_ones_still_run(ws):
    """The checks refuse the bad values only: their neighbours in range work."""
    (ws / "ok.toml").write_text('min_numel = 0\n[default]\nbits = 2\nsigmas = 0.5\n[[rule]]\nmatch = "*emb*"\nbits = 8\n')
    for args in (("quantize", "CKPT", "-o", "NEW", "--recipe", ws / "ok.toml", "--codec", "zstd"),
                 ("quantize", "CKPT", "-o", "NEW", "--bits", 8, "--sigmas", 1e-3, "--min-numel", 0, "--codec", "zstd")):
        (ws / "new.out").unlink(missing_ok=True)
        r = cli(*_fill(args, ws))
        assert r.exit_code == 0, r.output
        assert (ws / "new.out").stat().st_size > 0


def test_calibrate_says_when_the_tokens_hold_fewer_windows_than_asked(ws):
    r = cli(*_fill((*CAL, "-o", "NEW", "--seqs", 100, "--seq-len", 256, "--json"), ws))
    assert r.exit_code == 0, r.output
    assert "holds only 23 windows of 256 tokens, fewer than --seqs 100" in r.output
    from pgolf_pack.calib.hessian import load_hessians

    _, counts = load_hessians(ws / "new.out")
    assert max(counts.values()) == 23 * 256


def _spawn(args, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), **kw.pop("env", {})}
    return subprocess.Popen([sys.executable, "-m", "pgolf_pack.cli", *map(str, args)], cwd=kw.pop("cwd"), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _loading_torch(pid: int) -> bool:
    try:
        return "libtorch" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc to see the imports under way")
def test_ctrl_c_during_start_up_is_one_line(tmp_path):
    # The interrupt lands while torch is being imported (its library mapped, its modules still
    # loading: a second or more), whatever the machine's load.
    p = _spawn(("inspect", tmp_path / "x.pgp"), cwd=tmp_path)
    deadline = time.monotonic() + 60
    while not _loading_torch(p.pid):
        assert p.poll() is None and time.monotonic() < deadline, p.communicate()
        time.sleep(0.002)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 130, (p.returncode, err)
    assert err == "error: interrupted\n" and out == ""


def _lrzip_pids(marker: str) -> list[int]:
    """Processes whose command line names ``marker`` (the private temp folder an lrzip works in)."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if marker in (d / "cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(d.name))
            except OSError:
                continue
    return pids


@pytest.mark.skipif(shutil.which("lrzip") is None or not Path("/proc").is_dir(), reason="needs lrzip and /proc")
def test_ctrl_c_during_an_lrzip_pack_leaves_no_temp_folder_or_process(tmp_path):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    out = tmp_path / "m.pgp"
    p = _spawn(("quantize", EX_CKPT, "-o", out, "--codec", "lrzip"), cwd=tmp_path, env={"TMPDIR": str(tmp)})
    deadline = time.monotonic() + 120
    while not _lrzip_pids(str(tmp)):  # an lrzip is at work in its temp folder under tmp
        assert p.poll() is None, f"finished before any lrzip ran: {p.communicate()}"
        assert time.monotonic() < deadline, "no lrzip started"
        time.sleep(0.01)
    assert list(tmp.glob("pgolf-lrzip-*"))
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130, (p.returncode, err)
    assert err.strip().splitlines()[-1] == "error: interrupted" and "Traceback" not in err, err
    time.sleep(0.2)  # SIGKILLed children are reaped by init
    assert not list(tmp.iterdir()), list(tmp.iterdir())
    assert not _lrzip_pids(str(tmp))
    assert not out.exists() and not list(tmp_path.glob(".m.pgp.*"))
