"""Bad input: each case gets one ``error:`` line naming the file or setting, a non-zero
exit status and no partial output; images of any size are padded by reflection and cut back;
images of every mode are read with a note saying what was converted. docs/bad_inputs.md lists the
cases and what each gets."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner, Result
from PIL import Image
from skimage import data

from pipeline.degradations import Denoising, Inpainting, JpegDeblocking, SuperResolution
from pipeline.errors import SettingError, UserError
from pipeline.fit import FitConfig, fit
from pipeline.imageio import load_image, pad_box, reflect_pad
from pipeline.model import DecoderConfig, output_grid
from pipeline.observations import write_observation
from pipeline.problem import FitSize, load_problem, observed, simulate
from pipeline.results import check_output_dir, read_curves, write_result
from pipeline.settings import check_params, fit_settings, load_params
from pipeline.stopping import StoppingConfig
from pipeline.tuning import TuneConfig
from stages.cli import cli

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--iterations", "4", "--width", "8", "--device", "cpu"]


@pytest.fixture
def photo(tmp_path: Path) -> Path:
    """A 45×70 RGB photo: 45 rows, 70 columns, neither a multiple of 32."""
    path = tmp_path / "photo.png"
    Image.fromarray(data.astronaut()[::4, ::4][:45, :70]).save(path)
    return path


def invoke(*args: object) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args])


def assert_one_error(result: Result, *needles: str) -> str:
    """The command failed with exactly one ``error:`` line, containing every needle, and no
    traceback; returns that line."""
    assert result.exit_code != 0, result.output
    assert isinstance(result.exception, SystemExit), result.exception
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith(("error:", "Error:"))]
    assert len(errors) == 1, result.stderr
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def leftovers(folder: Path) -> list[str]:
    """Everything under ``folder`` (names relative to it)."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# ---------------------------------------------------------------- output folders


def test_an_impossible_output_folder_is_refused_before_the_fit_in_a_real_process(photo: Path):
    # the user's report at b5f53ba: a FileNotFoundError traceback, after the whole fit
    done = subprocess.run(
        [sys.executable, "-m", "stages", "fit", "denoising", photo, "-o", "/proc/forbidden"],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [
        "error: cannot create output folder /proc/forbidden: nothing can be written in /proc "
        "(No such file or directory)"
    ]
    assert not Path("/proc/forbidden").exists()


def test_an_output_path_through_a_file_is_refused(photo: Path, tmp_path: Path):
    result = invoke("fit", "denoising", photo, "-o", photo / "out", *TINY)
    assert_one_error(result, f"cannot create output folder {photo / 'out'}", "is not a folder")
    assert leftovers(tmp_path) == ["photo.png"]


def test_an_output_folder_that_is_a_file_is_refused(photo: Path):
    assert_one_error(invoke("fit", "denoising", photo, "-o", photo, *TINY), "is a file")
    with pytest.raises(UserError, match="is a file"):
        check_output_dir(photo)


def test_a_folder_without_write_permission_is_refused(photo: Path, tmp_path: Path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as root: permissions do not stop writes")
        result = invoke("fit", "denoising", photo, "-o", locked / "run", *TINY)
        assert_one_error(result, f"nothing can be written in {locked}", "Permission denied")
    finally:
        locked.chmod(0o700)
    assert leftovers(locked) == []


def mount(target: Path, options: str) -> None:
    """Mount a tmpfs at ``target``, or skip the test where that is not allowed."""
    target.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(target)],
        capture_output=True,
        check=False,
    )
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")


def test_a_read_only_file_system_is_refused(photo: Path, tmp_path: Path):
    frozen = tmp_path / "frozen"
    mount(frozen, "ro,size=64k")
    try:
        result = invoke("fit", "denoising", photo, "-o", frozen / "run", *TINY)
        assert_one_error(result, f"nothing can be written in {frozen}", "Read-only file system")
    finally:
        subprocess.run(["umount", str(frozen)], check=True)


def test_a_really_full_disk_is_one_error_line_and_leaves_nothing(photo: Path, tmp_path: Path):
    tiny = tmp_path / "tiny"
    mount(tiny, "size=24k")  # the probe fits; the run folder (≈ 40 kB of PNGs) does not
    try:
        result = invoke("fit", "denoising", photo, "-o", tiny / "a" / "run", *TINY)
        assert_one_error(result, f"cannot write {tiny / 'a' / 'run'}", "(the disk is full)")
        assert leftovers(tiny) == []
    finally:
        subprocess.run(["umount", str(tiny)], check=True)


def test_a_disk_that_fills_up_mid_run_leaves_no_folder(
    photo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    # simulated: the fourth file of the run folder meets a full disk
    real_fsync, calls = os.fsync, []

    def fsync(fd: int) -> None:
        calls.append(fd)
        if len(calls) == 4:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    out = tmp_path / "new" / "deeper" / "run"
    result = invoke("fit", "denoising", photo, "-o", out, *TINY)
    line = assert_one_error(result, f"cannot write {out}/", "No space left on device")
    assert line.endswith("(the disk is full)")
    assert leftovers(tmp_path) == ["photo.png"]  # no run folder, no temporary, no parents


def test_rewriting_a_run_folder_replaces_only_its_own_files(photo: Path, tmp_path: Path):
    out = tmp_path / "run"
    assert invoke("fit", "denoising", photo, "-o", out, *TINY).exit_code == 0
    (out / "notes.txt").write_text("mine")
    assert (out / "clean.png").is_file() and (out / "restored_best.png").is_file()
    result = invoke("fit", "denoising", photo, "--observed", "-o", out, *TINY)
    assert result.exit_code == 0, result.output
    # the observed photo has no clean image: the simulated run's clean.png and best are gone
    assert leftovers(out) == [
        "curves.csv",
        "notes.txt",
        "observation.png",
        "restored_final.png",
        "restored_stop.png",
        "summary.json",
    ]


# ---------------------------------------------------------------- numbers on the command line


@pytest.mark.parametrize(
    ("options", "needles"),
    [
        (["--lr", "inf"], ["--lr: lr must be a finite number > 0, got inf"]),
        (["--lr", "nan"], ["--lr", "nan"]),
        (["--lr", "0"], ["--lr", "> 0"]),
        (["--iterations", "0"], ["--iterations", ">= 1"]),
        (["--width", "0"], ["--width", ">= 1"]),
        (["--depth", "-1"], ["--depth", ">= 0"]),
        (["--lam", "nan"], ["--lam", "finite"]),
        (["--gauss-sigma", "0.1,nan,0.1,0.5,0.5"], ["--gauss-sigma", "nan"]),
        (["--gauss-sigma", "0.1,0.1"], ["--gauss-sigma", "gauss_sigma has 2 values"]),
        (["--seed", "-1"], ["--seed", ">= 0"]),
        (["--measure-every", "0"], ["--measure-every"]),
        (["--log-every", "0"], ["--log-every"]),
        (["--device", "meta"], ["device 'meta' is not supported"]),
        (["--sigma", "nan"], ["--sigma: sigma must be a finite number >= 0, got nan"]),
        (["--sigma", "-3"], ["sigma", ">= 0"]),
        (["--sigma", "1e400"], ["sigma", "inf"]),
        (["--width", "1e3"], ["'1e3' is not a valid integer"]),
    ],
)
def test_bad_numbers_on_the_command_line(photo: Path, tmp_path: Path, options, needles):
    out = tmp_path / "out"
    assert_one_error(invoke("fit", "denoising", photo, "-o", out, *TINY, *options), *needles)
    assert not out.exists()


@pytest.mark.parametrize(
    ("task", "options", "needle"),
    [
        ("inpainting", ["--p", "0"], "p must be a finite number > 0 and <= 1, got 0.0"),
        ("inpainting", ["--p", "nan"], "p must be"),
        ("deblocking", ["--quality", "101"], "quality must be an integer >= 1 and <= 100"),
        ("sr", ["--factor", "1"], "factor must be an integer >= 2, got 1"),
        ("sr", ["--factor", "3"], "--factor: super-resolution factor must divide 32, got 3"),
    ],
)
def test_bad_degradation_parameters(photo: Path, tmp_path: Path, task, options, needle):
    out = tmp_path / "out"
    assert_one_error(invoke("fit", task, photo, "-o", out, *TINY, *options), needle)
    assert not out.exists()


def test_a_fractional_noise_level_is_accepted(photo: Path, tmp_path: Path):
    # --sigma took its type from the default 25 (an int) and refused 12.5
    result = invoke("fit", "denoising", photo, "-o", tmp_path / "o", *TINY, "--sigma", "12.5")
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (lambda: FitConfig(iterations=True), "iterations must be an integer >= 1, got True"),
        (lambda: FitConfig(lr=True), "lr must be a finite number > 0, got True"),
        (lambda: FitConfig(halt_at_stop=1), "halt_at_stop must be true or false"),
        (lambda: FitConfig(backtrack="yes"), "backtrack must be true or false"),
        (lambda: FitConfig(threads=-1), "threads must be an integer >= 0"),
        (lambda: FitConfig(backtrack_drop_db=float("inf")), "backtrack_drop_db"),
        (lambda: DecoderConfig(width=True), "width must be an integer >= 1, got True"),
        (lambda: DecoderConfig(width=2.5), "width must be an integer"),
        (lambda: DecoderConfig(noise_scale=float("nan")), "noise_scale"),
        (lambda: DecoderConfig(gauss_sigma=(0.1, 0.1, 0.1, 0.5, True)), "gauss_sigma"),
        (lambda: DecoderConfig(upsample=5), "upsample has no list of entries"),
        (lambda: StoppingConfig(ratio_eps=float("nan")), "ratio_eps must be a finite number > 0"),
        (lambda: StoppingConfig(ratio_window=True), "ratio_window must be an integer >= 2"),
        (lambda: StoppingConfig(wmv_window=2.0), "wmv_window must be an integer >= 0"),
        (lambda: StoppingConfig(emv_alpha=float("nan")), "emv_alpha"),
        (lambda: TuneConfig(trials=True), "trials must be an integer >= 1"),
        (lambda: TuneConfig(holdout=1.0), "holdout must be a finite number > 0 and < 1"),
        (lambda: TuneConfig(holdout_seed=-1), "holdout_seed must be an integer >= 0"),
        (lambda: TuneConfig(ranges={"lam": (0.3, float("inf"))}), "range of lam"),
        (lambda: TuneConfig(prune="no"), "prune must be true or false"),
        (lambda: TuneConfig.from_dict({"search": 5}), "search must be a list"),
        (lambda: Denoising(sigma=True), "sigma must be a finite number >= 0, got True"),
        (lambda: Denoising(seed=-1), "seed must be an integer >= 0"),
        (lambda: JpegDeblocking(quality=50.0), "quality must be an integer"),
        (lambda: SuperResolution(phase=True), "phase must be 0 or 0.5, got True"),
        (lambda: Inpainting(mask=torch.zeros(40, 40)), "keeps no pixel"),
    ],
)
def test_every_settings_class_refuses_bad_numbers_naming_them(make, needle):
    with pytest.raises(UserError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        make()


# ---------------------------------------------------------------- numbers in params.yaml


def changed(params: dict, path: str, value: object) -> dict:
    """A deep copy of ``params`` with ``value`` at ``path`` (``a.b[1].c``)."""
    params = yaml.safe_load(yaml.safe_dump(params))
    keys = [
        int(k) if k.isdigit() else k for k in path.replace("[", ".").replace("]", "").split(".")
    ]
    node = params
    for key in keys[:-1]:
        node = node[key]
    node[keys[-1]] = value
    return params


@pytest.mark.parametrize(
    ("path", "value", "needle"),
    [
        ("data.resize", float("nan"), "params.yaml data.resize must be an integer >= 1, got nan"),
        ("data.crop", 0, "params.yaml data.crop must be an integer >= 1, got 0"),
        ("tasks.sr.observe.crop", True, "params.yaml tasks.sr.observe.crop must be an integer"),
        (
            "tasks.denoising.observe.sigmas[0]",
            float("nan"),
            "params.yaml tasks.denoising.observe.sigmas[0]: sigma must be a finite number",
        ),
        ("tasks.deblocking.observe.qualities[2]", 101, "observe.qualities[2]: quality must be"),
        ("tasks.inpainting.observe.p", 2, "params.yaml tasks.inpainting.observe.p: p must be"),
        ("tasks.sr.observe.factors[1]", True, "tasks.sr.observe.factors[1]: factor must be"),
        ("tasks.denoising.observe.channels", 2, "tasks.denoising.observe.channels must be 1, 3"),
        ("stopping.ratio.eps", float("nan"), "params.yaml stopping.ratio.eps: ratio_eps must be"),
        ("stopping.es_emv.alpha", 0, "params.yaml stopping.es_emv.alpha: emv_alpha must be"),
        ("stopping.es_wmv.patience", 1.5, "params.yaml stopping.es_wmv.patience: wmv_patience"),
        ("sweeps.iterations", 0, "params.yaml sweeps.iterations must be an integer >= 1"),
        ("sweeps.lam[1]", float("inf"), "params.yaml sweeps.lam[1] must be a finite number"),
        ("sweeps.gauss_sigma[0]", -1, "params.yaml sweeps.gauss_sigma[0] must be"),
        ("sweeps.batch", True, "params.yaml sweeps.batch must be an integer >= 1, got True"),
        ("checkpoints.every", 0, "params.yaml checkpoints.every must be an integer >= 1"),
        ("tune.batch", 0.5, "params.yaml tune.batch must be an integer >= 1"),
        ("fbc.thresholds[0]", 1.5, "params.yaml fbc.thresholds[0] must be a finite number"),
        ("aggregate.phenomena.min_baseline_drop", float("nan"), "phenomena.min_baseline_drop"),
        ("tasks.denoising", 5, "params.yaml tasks.denoising must be a mapping"),
    ],
)
def test_bad_numbers_in_params_yaml_name_their_path(cpu_profile, path, value, needle):
    with pytest.raises(UserError) as caught:
        check_params(changed(cpu_profile, path, value))
    assert needle in str(caught.value)


@pytest.mark.parametrize(
    ("path", "value", "method", "where"),
    [
        ("fit.lr", float("inf"), "dip", "params.yaml fit.lr"),
        ("tasks.sr.fit.lr", float("nan"), "dip", "params.yaml tasks.sr.fit.lr"),
        ("tasks.sr.fit.lam", float("nan"), "lipschitz", "params.yaml tasks.sr.fit.lam"),
        (
            "tasks.sr.fit.lam_gaussian",
            float("inf"),
            "gaussian",
            "params.yaml tasks.sr.fit.lam_gaussian",
        ),
        ("methods.dip.lam", float("nan"), "dip", "params.yaml methods.dip.lam"),
        ("fit.width", True, "dip", "params.yaml fit.width"),
        ("tasks.sr.fit.iterations", 2.5, "dip", "params.yaml tasks.sr.fit.iterations"),
        ("stopping.ratio.window", 1, "dip", "params.yaml stopping.ratio.window"),
    ],
)
def test_bad_fit_settings_in_params_yaml_name_their_path(cpu_profile, path, value, method, where):
    params = changed(cpu_profile, path, value)
    with pytest.raises(UserError) as caught:
        FitConfig.from_dict(fit_settings(params, "sr", method, "rocket", "factor4"))
    assert str(caught.value).startswith(f"{where}: "), caught.value


def test_a_per_image_setting_and_an_override_name_their_place(cpu_profile):
    params = changed(cpu_profile, "tasks.denoising.fit.per_image", {"coffee": {"lam": 1e999}})
    with pytest.raises(UserError, match=r"^params\.yaml tasks\.denoising\.fit\.per_image\.coffee"):
        FitConfig.from_dict(fit_settings(params, "denoising", "lipschitz", "coffee"))
    with pytest.raises(UserError, match=r"^command line lr: lr must be a finite number > 0"):
        FitConfig.from_dict(
            fit_settings(cpu_profile, "denoising", "dip", None, "default", {"lr": float("nan")})
        )


def test_a_bad_params_yaml_value_stops_a_stage_with_one_line(cpu_profile, tmp_path: Path):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(changed(cpu_profile, "data.resize", -4)))
    result = invoke("prepare", "denoising", "--params", params, "--out", tmp_path / "prepared")
    assert_one_error(result, "params.yaml data.resize must be an integer >= 1, got -4")
    assert leftovers(tmp_path) == ["params.yaml"]


# ---------------------------------------------------------------- corrupt files


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (b"fit: {lr: [0.1\n", "is not valid YAML at line 2, column 1"),
        (b"- a list\n- of things\n", "must hold a mapping, not list"),
        (b"", "must hold a mapping, not NoneType"),
        (b"\xff\xfe\x00garbage", "is not UTF-8 text"),
        (
            b"fit: {lr: 0.1}\nfit: {lr: 0.2}\n",
            "line 2, column 1: key 'fit' given twice (first at line 1)",
        ),
    ],
)
def test_a_corrupt_params_yaml_is_one_line(tmp_path: Path, content: bytes, needle: str):
    params = tmp_path / "params.yaml"
    params.write_bytes(content)
    result = invoke("prepare", "denoising", "--params", params)
    assert_one_error(result, f"settings file {params}", needle)


def test_a_params_yaml_that_is_a_folder_is_one_line(tmp_path: Path):
    assert_one_error(invoke("fbc", "--params", tmp_path), f"{tmp_path} is not readable")


@pytest.fixture
def repo(tmp_path: Path, cpu_profile: dict, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory with the default profile (width 8) and one prepared denoising
    observation of a 64×64 crop."""
    monkeypatch.chdir(tmp_path)
    image = tmp_path / "astronaut.png"
    Image.fromarray(data.astronaut()[::8, ::8][:64, :64]).save(image)
    problem = simulate("denoising", image, {"sigma": 25, "seed": 0})
    write_observation(tmp_path / "data/prepared/denoising/sigma25/astronaut", problem, {})
    fit = {**cpu_profile["fit"], "width": 8, "iterations": 4, "device": "cpu"}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({**cpu_profile, "fit": fit}))
    return tmp_path


OPTIMIZE = ["optimize", "denoising", "astronaut", "dip", "--variant", "25", "--no-track"]


def meta_with_param(folder: Path) -> None:
    """meta.json (hash and all) valid JSON, but naming a parameter no task has."""
    meta = json.loads((folder / "meta.json").read_text())
    meta["params"]["bogus"] = 1
    (folder / "meta.json").write_text(json.dumps(meta))


PREPARED = Path("data/prepared/denoising/sigma25/astronaut")


@pytest.mark.parametrize(
    ("damage", "needle"),
    [
        (lambda f: (f / "meta.json").write_text("{not json"), "meta.json is not readable JSON"),
        (lambda f: (f / "meta.json").unlink(), "no prepared observation"),
        (
            lambda f: (f / "observation.npy").write_bytes(b"garbage"),
            "is not a readable observation",
        ),
        (lambda f: (f / "observation.npy").unlink(), "is not a readable observation"),
        (lambda f: np.save(f / "observation.npy", np.zeros((3, 64, 64), np.float32)), "sha256"),
        (lambda f: (f / "clean.png").write_bytes(b"\x89PNG broken"), "not a readable image"),
        (meta_with_param, "unknown parameter(s) bogus for task 'denoising'"),
        (lambda f: (f / "meta.json").write_text("[1, 2]"), "meta.json has no params"),
    ],
)
def test_a_corrupt_prepared_observation_is_one_line(repo: Path, damage, needle):
    damage(repo / PREPARED)
    assert_one_error(invoke(*OPTIMIZE), needle)
    assert not Path("runs").exists()


def test_a_bad_fit_setting_stops_optimize_before_the_fit_naming_its_path(repo: Path):
    params = yaml.safe_load(Path("params.yaml").read_text())
    params["tasks"]["denoising"]["fit"]["lr"] = float("inf")
    Path("params.yaml").write_text(yaml.safe_dump(params))
    result = invoke(*OPTIMIZE)
    assert_one_error(result, "params.yaml tasks.denoising.fit.lr: lr must be a finite number > 0")
    assert not Path("runs").exists()


@pytest.mark.parametrize(
    "content",
    [b"garbage", b"PK\x03\x04 broken zip", b""],
)
def test_a_corrupt_checkpoint_is_one_line(repo: Path, content: bytes):
    checkpoint = Path(".checkpoints/runs/denoising/sigma25/astronaut/dip.pt")
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_bytes(content)
    result = invoke(*OPTIMIZE)
    assert_one_error(result, f"checkpoint {checkpoint} is", "delete it to start the fit over")
    assert not Path("runs").exists()


@pytest.fixture
def curves_file(tmp_path: Path) -> Path:
    return tmp_path / "curves.csv"


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (b"", "has no header line with an iteration column"),
        (b"loss,psnr\n0.1,20\n", "has no header line with an iteration column"),
        (b"iteration,loss\n", "has no measured iteration"),
        (b"iteration,loss\n0,0.1\n1\n", "line 3 has 1 values for 2 columns"),
        (b"iteration,loss\n0,0.1\n1,abc\n", "line 3: could not convert string to float: 'abc'"),
        (b"iteration,loss\n0,0.1\n1.5,0.2\n", "line 3: the iteration is not a whole number"),
        (b"iteration,loss\n,0.1\n", "line 2: the iteration is not a whole number"),
        (b"\xff\xd8\xff\xe0 jpeg bytes", "is not CSV text"),
    ],
)
def test_a_corrupt_curves_file_names_the_file_and_line(curves_file: Path, content, needle):
    curves_file.write_bytes(content)
    with pytest.raises(UserError, match=r"curves file .*curves\.csv") as caught:
        read_curves(curves_file)
    assert needle in str(caught.value)


def test_a_missing_curves_file_and_a_good_one(curves_file: Path):
    with pytest.raises(UserError, match="is not readable: No such file"):
        read_curves(curves_file)
    curves_file.write_text("iteration,loss,psnr\n0,0.5,\n2,0.25,21.5\n")
    curves = read_curves(curves_file)
    assert curves["iteration"].tolist() == [0, 2] and curves["iteration"].dtype == np.int64
    assert curves["loss"].tolist() == [0.5, 0.25]
    assert np.isnan(curves["psnr"][0]) and curves["psnr"][1] == 21.5


def test_a_corrupt_curves_file_stops_evaluate_with_one_line(repo: Path):
    assert invoke(*OPTIMIZE).exit_code == 0
    curves = Path("runs/denoising/sigma25/astronaut/dip/curves.csv")
    curves.write_text("iteration,loss\n0,0.1\n1,oops\n")
    assert_one_error(invoke("evaluate"), f"curves file {curves} line 3")


@pytest.mark.parametrize(
    ("content", "needle"),
    [("{broken", "is not readable JSON"), ('{"task": "denoising"}', "has no settings")],
)
def test_a_corrupt_summary_stops_evaluate_with_one_line(repo: Path, content: str, needle: str):
    assert invoke(*OPTIMIZE).exit_code == 0
    summary = Path("runs/denoising/sigma25/astronaut/dip/summary.json")
    summary.write_text(content)
    assert_one_error(invoke("evaluate"), str(summary), needle)
    assert not Path("results/evaluation.csv").exists()


def test_tune_refuses_an_impossible_output_folder_before_its_study(photo: Path):
    result = invoke("tune", "denoising", photo, "--out", "/proc/forbidden", "--storage", "memory")
    assert_one_error(result, "/proc/forbidden")
    assert "study" not in result.output  # refused before the study opened


# ---------------------------------------------------------------- image modes


def written(tmp_path: Path, name: str, image: Image.Image, **save: object) -> Path:
    path = tmp_path / name
    image.save(path, **save)
    return path


def rgb_pixels(height: int = 33, width: int = 41) -> np.ndarray:
    return np.random.default_rng(7).integers(0, 256, (height, width, 3), dtype=np.uint8)


def test_grey_and_rgb_files_are_read_without_a_note(tmp_path: Path, capsys):
    a = rgb_pixels()
    grey = load_image(written(tmp_path, "g.png", Image.fromarray(a[..., 0])))
    rgb = load_image(written(tmp_path, "c.png", Image.fromarray(a)))
    np.testing.assert_array_equal(grey[0, 0].numpy(), a[..., 0] / np.float32(255))
    np.testing.assert_array_equal(rgb[0].permute(1, 2, 0).numpy(), a / np.float32(255))
    assert capsys.readouterr().err == ""


def test_a_16_bit_grey_file_keeps_its_precision_with_a_note(tmp_path: Path, capsys):
    a = np.random.default_rng(1).integers(0, 65536, (33, 41), dtype=np.uint16)
    path = written(tmp_path, "deep.png", Image.fromarray(a))
    x = load_image(path)
    np.testing.assert_allclose(x[0, 0].numpy(), a / 65535.0, rtol=0, atol=3e-8)
    assert capsys.readouterr().err == (
        f"note: image {path} is mode I;16: 16-bit grey; the restored images are saved with 8 bits\n"
    )


@pytest.mark.parametrize(
    ("mode", "channels", "note"),
    [
        ("RGBA", 3, "mode RGBA: alpha dropped, read as RGB"),
        ("LA", 1, "mode LA: alpha dropped, read as grey"),
        ("P", 3, "mode P: palette looked up, read as RGB"),
        ("1", 1, "mode 1: bilevel, read as grey 0/1"),
        ("CMYK", 3, "mode CMYK: converted to RGB without a colour profile"),
    ],
)
def test_converted_modes_are_read_with_a_note(tmp_path: Path, capsys, mode, channels, note):
    a = rgb_pixels()
    rgba = np.dstack([a, np.random.default_rng(2).integers(0, 256, a.shape[:2], dtype=np.uint8)])
    source = {
        "RGBA": Image.fromarray(rgba),
        "LA": Image.fromarray(rgba[..., [0, 3]], mode="LA"),
        "P": Image.fromarray(a).convert("P"),
        "1": Image.fromarray(a[..., 0] > 127),
        "CMYK": Image.frombytes("CMYK", (41, 33), rgba.tobytes()),
    }[mode]
    path = written(tmp_path, f"x.{'jpg' if mode == 'CMYK' else 'png'}", source)
    with Image.open(path) as stored:
        assert stored.mode == mode
        raw = np.asarray(stored)
        palette = stored.getpalette()
    x = load_image(path)
    assert x.shape == (1, channels, 33, 41)
    pixels = x[0].permute(1, 2, 0).numpy()
    if mode == "RGBA":  # independent of Pillow's conversion: the first three bytes
        np.testing.assert_array_equal(pixels, rgba[..., :3] / np.float32(255))
    elif mode == "LA":
        np.testing.assert_array_equal(pixels[..., 0], rgba[..., 0] / np.float32(255))
    elif mode == "P":
        lookup = np.asarray(palette, np.float32).reshape(-1, 3)[raw]
        np.testing.assert_array_equal(pixels, lookup / 255)
    elif mode == "1":
        np.testing.assert_array_equal(pixels[..., 0], raw.astype(np.float32))
    else:  # CMYK → RGB as (255 − C)(255 − K)/255, rounded
        expected = (255 - raw[..., :3].astype(float)) * (255 - raw[..., 3:].astype(float)) / 255
        np.testing.assert_allclose(pixels * 255, expected, rtol=0, atol=0.5 + 1e-4)
    assert capsys.readouterr().err == f"note: image {path} is {note}\n"


def test_a_camera_rotation_and_frames_are_applied_with_a_note(tmp_path: Path, capsys):
    a = rgb_pixels()
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    path = written(tmp_path, "camera.png", Image.fromarray(a), exif=exif)
    x = load_image(path)
    np.testing.assert_array_equal(
        x[0].permute(1, 2, 0).numpy(), np.rot90(a, k=-1) / np.float32(255)
    )
    assert "turned upright as its EXIF orientation says" in capsys.readouterr().err
    frames = [Image.fromarray(a).convert("P"), Image.fromarray(a[::-1]).convert("P")]
    gif = tmp_path / "anim.gif"
    frames[0].save(gif, save_all=True, append_images=frames[1:])
    assert load_image(gif).shape == (1, 3, 33, 41)
    assert "the first of its 2 frames used" in capsys.readouterr().err


def test_16_bit_colour_is_read_at_8_bits_with_a_note(tmp_path: Path, capsys):
    # Pillow writes no 16-bit RGB PNG: this one is made by hand (IHDR bit depth 16, colour type 2)
    import struct
    import zlib

    a = np.random.default_rng(3).integers(0, 65536, (33, 41, 3)).astype(">u2")
    rows = b"".join(b"\x00" + a[i].tobytes() for i in range(33))

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", 41, 33, 16, 2, 0, 0, 0)
    path = tmp_path / "deep.png"
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )
    x = load_image(path)
    np.testing.assert_array_equal(x[0].permute(1, 2, 0).numpy(), (a >> 8) / np.float32(255))
    assert "16-bit colour read at 8 bits per channel" in capsys.readouterr().err


# ---------------------------------------------------------------- any size


@pytest.mark.parametrize(
    ("height", "width", "multiple", "minimum", "box"),
    [
        (45, 70, 32, 64, (9, 13, 64, 96)),  # (64 − 45) // 2, (96 − 70) // 2
        (64, 96, 32, 64, (0, 0, 64, 96)),  # already a fit size
        (32, 32, 32, 64, (16, 16, 64, 64)),  # one block: padded to the reflection minimum
        (65, 33, 32, 64, (15, 15, 96, 64)),  # an odd surplus: the extra row goes to the bottom
        (21, 30, 8, 16, (1, 1, 24, 32)),  # an SR ×4 photo: multiples of 8
        (32, 40, 32, 32, (0, 12, 32, 64)),  # zeros padding: no minimum beyond one block
    ],
)
def test_pad_box(height, width, multiple, minimum, box):
    assert pad_box(height, width, multiple, minimum) == box


def test_the_default_fit_size_is_the_default_decoders():
    assert (FitSize().multiple, FitSize().minimum) == output_grid(DecoderConfig())
    assert output_grid(DecoderConfig(depth=3, gauss_sigma=(0.1,) * 3, padding="zeros")) == (8, 8)


def test_reflection_padding_is_numpys_reflect_and_is_cut_back():
    x = torch.rand(1, 3, 45, 70, generator=torch.Generator().manual_seed(0))
    padded = reflect_pad(x, (9, 13, 64, 96))
    expected = np.pad(x.numpy(), ((0, 0), (0, 0), (9, 10), (13, 13)), mode="reflect")
    np.testing.assert_array_equal(padded.numpy(), expected)


def test_a_simulated_photo_is_padded_and_degraded_whole(photo: Path, capsys):
    problem = load_problem("denoising", photo, {"sigma": 25, "seed": 0})
    clean = load_image(photo)
    assert problem.region == (9, 13, 45, 70)
    assert problem.clean.shape == problem.observation.shape == (1, 3, 64, 96)
    expected = np.pad(clean.numpy(), ((0, 0), (0, 0), (9, 10), (13, 13)), mode="reflect")
    np.testing.assert_array_equal(problem.clean.numpy(), expected)
    torch.testing.assert_close(problem.crop_output(problem.clean), clean, rtol=0, atol=0)
    assert problem.observed_part().shape == (1, 3, 45, 70)
    assert capsys.readouterr().err == (
        "note: photo.png is 45×70 px: fitted at 64×96 px, padded by reflection; the outputs are "
        "cut back to 45×70 px\n"
    )


def test_crop_keeps_the_papers_protocol(photo: Path):
    problem = simulate("denoising", photo, {"sigma": 25}, size=FitSize("crop"))
    assert problem.region is None and problem.clean.shape == (1, 3, 32, 64)
    torch.testing.assert_close(problem.clean, load_image(photo)[..., 6:38, 3:67])


def test_an_sr_photo_is_padded_to_multiples_of_32_over_its_factor(tmp_path: Path):
    path = tmp_path / "small.png"
    Image.fromarray(rgb_pixels(21, 30)).save(path)
    problem = observed("sr", path, {"factor": 4})
    assert problem.observation.shape == (1, 3, 24, 32)  # LR: multiples of 8, at least 16
    assert problem.region == (4, 4, 84, 120)  # (1, 1, 21, 30) in LR pixels, × 4
    torch.testing.assert_close(problem.observed_part(), load_image(path), rtol=0, atol=0)


def test_a_simulated_sr_image_shows_the_lr_pixels_that_cover_it(photo: Path):
    problem = simulate("sr", photo, {"factor": 4}, size=FitSize())
    assert problem.observation.shape == (1, 3, 16, 24) and problem.region == (9, 13, 45, 70)
    # rows ⌊9/4⌋ = 2 .. ⌈54/4⌉ = 14, columns ⌊13/4⌋ = 3 .. ⌈83/4⌉ = 21
    assert problem.observed_part().shape == (1, 3, 12, 18)


def test_an_inpainting_mask_is_padded_like_its_photo(photo: Path, tmp_path: Path):
    holes = np.full((45, 70), 255, np.uint8)
    holes[10:20, 5:30] = 0
    mask_path = tmp_path / "holes.png"
    Image.fromarray(holes).save(mask_path)
    problem = observed("inpainting", photo, {}, mask_path)
    mask = np.pad((holes > 127).astype(np.float32), ((9, 10), (13, 13)), mode="reflect")
    np.testing.assert_array_equal(problem.task.mask[0, 0].numpy(), mask)
    photo_pixels = np.pad(load_image(photo)[0].numpy(), ((0, 0), (9, 10), (13, 13)), "reflect")
    np.testing.assert_array_equal(problem.observation[0].numpy(), photo_pixels * mask)


@pytest.mark.parametrize(
    ("size", "needle"),
    [((20, 40), "20×40 px (height×width) is smaller than 32 px"), ((40, 31), "40×31")],
)
def test_an_image_smaller_than_one_block_is_refused(tmp_path: Path, size, needle):
    # reflection can only mirror an image once: a 20-px side would need a 22-px mirror on each side
    path = tmp_path / "tiny.png"
    Image.fromarray(np.zeros(size, np.uint8)).save(path)
    result = invoke("fit", "denoising", path, "-o", tmp_path / "out", *TINY)
    assert_one_error(result, f"image {path}: image of", needle)
    assert not (tmp_path / "out").exists()


def test_the_fits_psnr_is_read_on_the_users_image(photo: Path):
    problem = load_problem("denoising", photo, {"sigma": 25, "seed": 0})
    config = FitConfig.from_dict({"iterations": 6, "width": 8, "device": "cpu"})
    result = fit(
        problem.observation, problem.task, config, clean=problem.clean, region=problem.region
    )
    ignored = fit(problem.observation, problem.task, config, clean=problem.clean)
    # the same fit either way (PSNR steers nothing); its final output is the last measured one
    torch.testing.assert_close(result.final, ignored.final, rtol=0, atol=0)
    mse = np.mean(
        (problem.crop_output(result.final) - load_image(photo)).numpy().astype(np.float64) ** 2
    )
    assert result.curves["psnr"][-1] == pytest.approx(10 * np.log10(1 / mse), abs=1e-4)
    whole = np.mean((result.final - problem.clean).numpy().astype(np.float64) ** 2)
    assert ignored.curves["psnr"][-1] == pytest.approx(10 * np.log10(1 / whole), abs=1e-4)
    assert abs(10 * np.log10(whole / mse)) > 0.01  # the padded area does change the number


def test_an_observed_photo_gets_outputs_of_its_own_size(photo: Path, tmp_path: Path):
    out = tmp_path / "out"
    result = invoke("fit", "denoising", photo, "--observed", "-o", out, *TINY)
    assert result.exit_code == 0, result.output
    for name in ("observation.png", "restored_stop.png", "restored_final.png"):
        with Image.open(out / name) as image:
            assert image.size == (70, 45), name
    np.testing.assert_array_equal(
        np.asarray(Image.open(out / "observation.png")), np.asarray(Image.open(photo))
    )


def test_write_result_cuts_every_image_to_the_region(photo: Path, tmp_path: Path):
    problem = load_problem("denoising", photo, {"sigma": 25, "seed": 0})
    config = FitConfig.from_dict({"iterations": 3, "width": 8, "device": "cpu"})
    result = fit(
        problem.observation, problem.task, config, clean=problem.clean, region=problem.region
    )
    summary = write_result(tmp_path / "run", problem, result)
    assert summary["region"] == [9, 13, 45, 70]
    saved = load_image(tmp_path / "run" / "restored_final.png")
    expected = np.round(np.clip(result.final[..., 9:54, 13:83].numpy(), 0, 1) * 255) / 255
    np.testing.assert_allclose(saved.numpy(), expected, rtol=0, atol=1e-7)
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["region"] == [9, 13, 45, 70]


# ---------------------------------------------------------------- masks


def mask_file(tmp_path: Path, pixels: np.ndarray, name: str = "mask.png") -> Path:
    path = tmp_path / name
    Image.fromarray(pixels).save(path)
    return path


def holes(shape=(45, 70)) -> np.ndarray:
    pixels = np.full(shape, 255, np.uint8)
    pixels[5:15, 10:40] = 0
    return pixels


@pytest.mark.parametrize(
    ("pixels", "needle"),
    [
        (holes((45, 71)), "is 45×71 px but the image is 45×70 px"),
        (np.zeros((45, 70), np.uint8), "inpainting mask keeps no pixel"),
        ((holes() // 255).astype(np.uint8), "its brightest is 1 of 255"),
    ],
)
def test_bad_masks_are_one_line(photo: Path, tmp_path: Path, pixels, needle):
    path = mask_file(tmp_path, pixels)
    result = invoke("fit", "inpainting", photo, "--mask", path, "-o", tmp_path / "out", *TINY)
    assert_one_error(result, f"mask {path}", needle)
    assert not (tmp_path / "out").exists()


def test_an_h5_mask_with_other_values_is_one_line(photo: Path, tmp_path: Path):
    path = tmp_path / "mask.h5"
    with h5py.File(path, "w") as handle:
        handle["mask"] = np.full((1, 45, 70), 2, np.int64)
    result = invoke("fit", "inpainting", photo, "--mask", path, "-o", tmp_path / "out", *TINY)
    assert_one_error(result, f"mask dataset in {path} must hold only 0 and 1")


def test_grey_and_all_white_masks_get_notes(photo: Path, tmp_path: Path, capsys):
    grey = holes()
    grey[20:30] = 200  # kept, but not white: thresholded
    grey[30:35] = 100  # missing
    problem = observed("inpainting", photo, {}, mask_file(tmp_path, grey))
    kept = np.pad((grey > 127).astype(np.float32), ((9, 10), (13, 13)), mode="reflect")
    np.testing.assert_array_equal(problem.task.mask[0, 0].numpy(), kept)
    assert "has 4 grey levels; brighter than half white = kept" in capsys.readouterr().err
    white = mask_file(tmp_path, np.full((45, 70), 255, np.uint8), "white.png")
    observed("inpainting", photo, {}, white)
    assert f"mask {white} keeps every pixel" in capsys.readouterr().err


def test_a_mask_for_a_task_without_one_is_one_line(photo: Path, tmp_path: Path):
    path = mask_file(tmp_path, holes())
    result = invoke("fit", "denoising", photo, "--mask", path, "-o", tmp_path / "out", *TINY)
    assert_one_error(result, "a mask is only used by tasks that take one, not by 'denoising'")


def test_the_settings_error_knows_its_setting():
    with pytest.raises(SettingError) as caught:
        FitConfig(lr=float("inf"))
    assert caught.value.setting == "lr"


def test_load_params_checks_the_file(cpu_profile, tmp_path: Path):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(changed(cpu_profile, "sweeps.lam[0]", "a lot")))
    with pytest.raises(UserError, match=r"params\.yaml sweeps\.lam\[0\] must be a finite number"):
        load_params(path)


def test_a_budget_too_large_for_memory_is_one_line(photo: Path, tmp_path: Path):
    result = invoke(
        "fit", "denoising", photo, "-o", tmp_path / "out", *TINY, "--iterations", 10**13
    )
    assert_one_error(result, "error: out of memory", "use a smaller image, --width or budget")
    assert not (tmp_path / "out").exists()


def test_tune_refuses_an_unwritable_output_folder_before_the_study(photo: Path):
    args = ["--storage", "memory", "--no-track", "--trials", "1", "--iterations", "2"]
    result = invoke("tune", "denoising", photo, "--out", "/proc/tuned", "--width", "8", *args)
    assert_one_error(
        result, "error: cannot create output folder /proc/tuned: nothing can be written in /proc "
    )
    assert "trial" not in result.stdout


def test_an_unforeseen_file_system_error_is_one_line(
    photo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    # a disk that fills during the study: the folder passed its check, the write still fails
    def full_disk(*_: object, **__: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "tuned"))

    monkeypatch.setattr("stages.tune.run_study", full_disk)
    args = ["--storage", "memory", "--no-track", "--trials", "1", "--iterations", "2"]
    result = invoke("tune", "denoising", photo, "--out", tmp_path / "tuned", "--width", "8", *args)
    assert_one_error(result, f"error: {tmp_path / 'tuned'}: ", "No space left on device")
