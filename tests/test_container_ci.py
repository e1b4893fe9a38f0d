"""The Dockerfile, its build context and the PR robustness-gate workflow, checked without Docker or GitHub.

- the Dockerfile lints clean (hadolint) for the CPU and the CUDA variant, installs torch==2.13.0 from
  the variant's PyTorch index before the package, and uses the Makefile's constraints file;
- everything it COPYs exists and is in the build context (.dockerignore, matched like Docker does);
  the image's DVC step really fetches data/ from dvc-store/ in that context, without .git;
- the workflow validates against GitHub's workflow schema (check-jsonschema, offline) and runs the
  README's install, the pipeline and `ctharden ci-gate --base` on pull requests with full history.
"""

from __future__ import annotations

import copy
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
WORKFLOW = REPO / ".github" / "workflows" / "robustness-gate.yml"
BIN = Path(sys.executable).parent

TORCH_PIN = "torch==2.13.0"
VARIANTS = {  # build args of each documented variant
    "cpu": {"TORCH_INDEX": "https://download.pytorch.org/whl/cpu"},
    "cu128": {"TORCH_INDEX": "https://download.pytorch.org/whl/cu128"},
}
# What the image needs from the build context to install the package and run the flow / dvc repro.
NEEDED_IN_CONTEXT = [
    "pyproject.toml", "constraints.txt", "README.md", "DATA_LICENSES.md", "Makefile",
    "src/ctharden/__init__.py", "src/ctharden/cli.py", "flows/pipeline.py",
    "params.yaml", "dvc.yaml", "dvc.lock", "data.dvc", ".dvc/config", ".dvcignore", "dvc-store",
    "metrics/robustness.json",
]
RUN_STATE = [".venv", ".venv/bin/python", "mlruns", "mlruns/0/meta.yaml", "mlflow.db", ".git", ".git/HEAD",
             "data", "data/lidc_idri_sample/x.dcm", ".dvc/cache", ".dvc/tmp", ".prefect", "artifacts/models",
             "reports/robustness/index.html", "src/ctharden/__pycache__/cli.cpython-311.pyc",
             "src/ctharden.egg-info/PKG-INFO", ".pytest_cache"]


# --- helpers ------------------------------------------------------------------------------------

def _tool(name: str) -> str:
    """A console script of this environment (dev extras), else one on PATH; missing is a failure."""
    path = BIN / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: `make install` installs the dev extras")
    return found


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):  # a comment inside a continued instruction
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        word, _, args = buf.partition(" ")
        out.append((word.upper(), args.strip()))
        buf = ""
    assert not buf, "Dockerfile ends inside a continued instruction"
    return out


def render_variant(text: str, build_args: dict[str, str]) -> str:
    """The Dockerfile with the ARG defaults replaced by ``build_args`` (what `--build-arg` selects)."""
    for name, value in build_args.items():
        text, n = re.subn(rf"^ARG {name}=.*$", f"ARG {name}={value}", text, flags=re.M)
        assert n == 1, f"the Dockerfile has no `ARG {name}=...` for the variant to set"
    return text


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern as a regex (Go filepath.Match plus `**`, as Docker's patternmatcher)."""
    out, i = "", 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif c == "*":
            out, i = out + "[^/]*", i + 1
        elif c == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(c), i + 1
    return re.compile(out + r"\Z")


def dockerignore_patterns(text: str) -> list[tuple[re.Pattern[str], bool]]:
    pats = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        line = os.path.normpath(line.lstrip("!").strip()).lstrip("/")
        pats.append((_pattern_regex(line), negate))
    return pats


def excluded(path: str, patterns: list[tuple[re.Pattern[str], bool]]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent directories decides."""
    parts = Path(path).parts
    candidates = ["/".join(parts[: k + 1]) for k in range(len(parts))]
    result = False
    for regex, negate in patterns:
        if any(regex.match(c) for c in candidates):
            result = not negate
    return result


def build_context_files() -> list[str]:
    """The files `docker build .` sends: everything here (tracked or not, not git-ignored) minus .dockerignore."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
        capture_output=True, text=True, check=True,
    ).stdout.splitlines()
    patterns = dockerignore_patterns(DOCKERIGNORE.read_text())
    return [f for f in listed if (REPO / f).is_file() and not excluded(f, patterns)]


def shell_commands(script: str) -> list[list[str]]:
    """The simple commands of a shell line, split at `&&`, `||`, `;` and `|` outside quotes."""
    lex = shlex.shlex(script, posix=True, punctuation_chars=True)
    lex.whitespace_split = True
    commands: list[list[str]] = [[]]
    for token in lex:
        if token in {"&&", "||", ";", "|"}:
            commands.append([])
        else:
            commands[-1].append(token)
    return [c for c in commands if c]


def pip_installs(instructions: list[tuple[str, str]]) -> list[tuple[int, list[str]]]:
    """(instruction index, argv) of every `pip install` in a RUN."""
    found = []
    for idx, (word, args) in enumerate(instructions):
        if word != "RUN":
            continue
        for argv in shell_commands(args):
            if len(argv) >= 2 and Path(argv[0]).name in {"pip", "pip3"} and argv[1] == "install":
                found.append((idx, argv))
            elif argv[:4] in (["python", "-m", "pip", "install"], ["python3", "-m", "pip", "install"]):
                found.append((idx, argv[2:]))
    return found


def constraint_files(argv: list[str]) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv[:-1]) if a in {"-c", "--constraint"}] + [
        a.split("=", 1)[1] for a in argv if a.startswith("--constraint=")
    ]


def makefile_constraints() -> list[str]:
    makefile = (REPO / "Makefile").read_text()
    line = next(ln for ln in makefile.splitlines() if "pip install" in ln)
    files = constraint_files(shlex.split(line.strip()))
    assert files, "the Makefile's install uses no constraints file"
    return files


def load_workflow() -> dict:
    wf = yaml.safe_load(WORKFLOW.read_text())
    if True in wf:  # YAML 1.1: the key `on` loads as True
        wf["on"] = wf.pop(True)
    return wf


def step_runs(job: dict) -> list[str]:
    return [s.get("run", "") for s in job["steps"]]


def first_step(job: dict, needle: str) -> int:
    for i, step in enumerate(job["steps"]):
        if needle in step.get("run", "") or needle in step.get("uses", ""):
            return i
    raise AssertionError(f"no step runs or uses {needle!r}")


# --- Dockerfile ---------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_hadolint_passes(variant: str, tmp_path: Path) -> None:
    text = DOCKERFILE.read_text()
    rendered = render_variant(text, VARIANTS[variant])
    if variant == "cpu":
        assert rendered == text, "the Dockerfile's defaults must be the CPU variant"
    path = tmp_path / "Dockerfile"
    path.write_text(rendered)
    proc = subprocess.run([_tool("hadolint"), "--no-color", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0 and not proc.stdout.strip(), proc.stdout + proc.stderr


def test_hadolint_catches_a_problem(tmp_path: Path) -> None:
    """The lint is live: an unpinned pip install in the same Dockerfile is reported."""
    path = tmp_path / "Dockerfile"
    path.write_text(DOCKERFILE.read_text() + "RUN pip install requests\n")
    proc = subprocess.run([_tool("hadolint"), "--no-color", str(path)], capture_output=True, text=True)
    assert proc.returncode != 0 and "DL3013" in proc.stdout


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_torch_from_pytorch_index_before_the_package(variant: str) -> None:
    text = render_variant(DOCKERFILE.read_text(), VARIANTS[variant])
    ins = dockerfile_instructions(text)
    args = {a.split("=", 1)[0]: a.split("=", 1)[1] for w, a in ins if w == "ARG" and "=" in a}
    installs = pip_installs(ins)

    torch_installs = [(i, argv) for i, argv in installs if any(a.startswith("torch") for a in argv)]
    assert len(torch_installs) == 1, f"torch must be installed by exactly one pip install: {torch_installs}"
    t_idx, t_argv = torch_installs[0]
    assert TORCH_PIN in t_argv, t_argv
    index = t_argv[t_argv.index("--index-url") + 1]
    index = re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), index)
    assert index == VARIANTS[variant]["TORCH_INDEX"], index

    package = [(i, argv) for i, argv in installs if "." in argv[2:]]
    assert len(package) == 1, f"the package must be installed once with `pip install ... .`: {installs}"
    p_idx, p_argv = package[0]
    assert t_idx < p_idx, "torch must be installed before the package so pip keeps the index's build"
    assert "-e" not in p_argv and "--no-deps" not in p_argv

    # Every other pip install uses the Makefile's constraints file, which pins the same torch.
    wanted = makefile_constraints()
    for i, argv in installs:
        if i != t_idx:
            assert constraint_files(argv) == wanted, argv
    constraints = (REPO / wanted[0]).read_text().splitlines()
    assert TORCH_PIN in constraints, f"{wanted[0]} must pin {TORCH_PIN} so the package install keeps torch"
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert TORCH_PIN in deps


def test_makefile_install_matches_the_image() -> None:
    """Same constraints file in both; the image installs the same project (pyproject.toml)."""
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"pip install .*-c constraints\.txt .*-e \"\.\[dev\]\"", makefile), "Makefile install changed"
    assert makefile_constraints() == ["constraints.txt"]


def test_copied_paths_exist_and_are_in_the_build_context() -> None:
    ins = dockerfile_instructions(DOCKERFILE.read_text())
    patterns = dockerignore_patterns(DOCKERIGNORE.read_text())
    copies = [shlex.split(a) for w, a in ins if w in {"COPY", "ADD"}]
    assert copies
    for argv in copies:
        assert not any(a.startswith("--from") for a in argv), "no multi-stage copies expected"
        sources = [a for a in argv if not a.startswith("--")][:-1]
        for src in sources:
            src = src.rstrip("/") or "."
            assert (REPO / src).exists(), f"COPY {src}: not in the repository"
            if src != ".":
                assert not excluded(src, patterns), f"COPY {src}: excluded by .dockerignore"
    context = set(build_context_files())
    for need in NEEDED_IN_CONTEXT:
        assert any(f == need or f.startswith(need + "/") for f in context), f"{need} is not in the build context"


@pytest.mark.parametrize("path", RUN_STATE)
def test_dockerignore_keeps_out_run_state(path: str) -> None:
    assert excluded(path, dockerignore_patterns(DOCKERIGNORE.read_text())), f"{path} would be sent to docker build"


def test_dockerignore_matcher() -> None:
    """The helper follows Docker's rules (parents, `**`, exceptions), so the checks above mean something."""
    pats = dockerignore_patterns("data\n**/__pycache__\n/build\n*.md\n!README.md\n")
    assert excluded("data/a/b.npy", pats) and not excluded("src/data/x.py", pats)
    assert excluded("src/pkg/__pycache__/m.pyc", pats) and excluded("__pycache__/m.pyc", pats)
    assert excluded("build/lib/x", pats) and not excluded("src/build.py", pats)
    assert excluded("NOTES.md", pats) and not excluded("README.md", pats) and not excluded("docs/x.md", pats)


def test_image_runs_the_flow_as_a_non_root_user() -> None:
    ins = dockerfile_instructions(DOCKERFILE.read_text())
    words = [w for w, _ in ins]
    assert words.count("FROM") == 1
    cmd = [a for w, a in ins if w == "CMD"]
    assert cmd and yaml.safe_load(cmd[-1]) == ["python", "flows/pipeline.py"]
    assert not any(w == "ENTRYPOINT" for w in words), "no ENTRYPOINT: `docker run IMAGE ctharden ...` must work"
    users = [a for w, a in ins if w == "USER"]
    assert users and users[-1].split(":")[0] not in {"0", "root"}
    assert words.index("USER") > max(i for i, (_, a) in enumerate(ins) if "pip install" in a)
    env = " ".join(a for w, a in ins if w == "ENV")
    assert re.search(r"MLFLOW_TRACKING_URI=sqlite:///", env) and "PREFECT_HOME=" in env
    apt = next(a for w, a in ins if w == "RUN" and "apt-get install" in a)
    assert {"git", "make"} <= set(shlex.split(apt))


def test_image_dvc_step_fetches_the_data_without_git(tmp_path: Path) -> None:
    """Run the Dockerfile's own `dvc pull` RUN in a copy of the build context (no .git, no data/)."""
    ctx = tmp_path / "app"
    for f in build_context_files():
        (ctx / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / f, ctx / f)
    assert not (ctx / ".git").exists() and not (ctx / "data").exists()
    ins = dockerfile_instructions(DOCKERFILE.read_text())
    dvc_runs = [a for w, a in ins if w == "RUN" and "dvc pull" in a]
    assert len(dvc_runs) == 1
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1",
           "GIT_CEILING_DIRECTORIES": str(tmp_path)}  # never find a repository above the copy
    proc = subprocess.run(["sh", "-c", dvc_runs[0]], cwd=ctx, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = yaml.safe_load((ctx / "data.dvc").read_text())["outs"][0]
    files = [p for p in (ctx / "data").rglob("*") if p.is_file()]
    assert len(files) == out["nfiles"]
    assert (ctx / "data" / "lidc_idri_sample").is_dir() and (ctx / "data" / "covid_ct_soares").is_dir()


# --- workflow -----------------------------------------------------------------------------------

def test_workflow_matches_githubs_schema(tmp_path: Path) -> None:
    tool = _tool("check-jsonschema")
    proc = subprocess.run([tool, "--builtin-schema", "vendor.github-workflows", str(WORKFLOW)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # The schema check is live: a job without runs-on is rejected.
    broken = tmp_path / "broken.yml"
    broken.write_text(WORKFLOW.read_text().replace("runs-on:", "runs_on:"))
    proc = subprocess.run([tool, "--builtin-schema", "vendor.github-workflows", str(broken)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "runs-on" in proc.stdout


def test_workflow_triggers_permissions_concurrency() -> None:
    wf = load_workflow()
    assert "pull_request" in wf["on"] and "workflow_dispatch" in wf["on"]
    assert wf["permissions"] == {"contents": "read"}
    assert wf["concurrency"]["cancel-in-progress"] is True
    assert wf["env"]["PROFILE"] == "default"
    assert set(wf["jobs"]) == {"gate", "tests"}
    for job in wf["jobs"].values():
        assert 0 < job["timeout-minutes"] <= 360


def test_gate_job_runs_install_pipeline_and_ci_gate() -> None:
    wf = load_workflow()
    job = wf["jobs"]["gate"]
    steps = job["steps"]
    checkout = steps[first_step(job, "actions/checkout")]
    assert checkout["with"]["fetch-depth"] == 0, "dvc metrics diff against the base needs full history"
    py = steps[first_step(job, "actions/setup-python")]
    assert str(py["with"]["python-version"]) == "3.11" and py["with"]["cache"] == "pip"

    i_install, i_pull = first_step(job, "make install"), first_step(job, "dvc pull")
    i_repro, i_gate = first_step(job, "dvc repro"), first_step(job, "ctharden ci-gate")
    assert i_install < i_pull < i_repro < i_gate
    assert "data.dvc" in steps[i_pull]["run"]
    assert steps[i_repro]["env"]["CTHARDEN_PROFILE"] == "${{ env.PROFILE }}"
    gate = shlex.split(steps[i_gate]["run"])
    assert gate[:3] == ["ctharden", "ci-gate", "--base"] and gate[3].startswith("origin/")
    assert "base_ref" in steps[i_gate]["env"]["BASE_REF"]
    assert gate[gate.index("--summary") + 1] == "$GITHUB_STEP_SUMMARY"

    restore = steps[first_step(job, "actions/cache/restore")]
    assert restore["with"]["path"] == ".dvc/cache" and "hashFiles('dvc.lock')" in restore["with"]["key"]
    assert first_step(job, "actions/cache/restore") < i_repro < first_step(job, "actions/cache/save")

    upload = steps[first_step(job, "actions/upload-artifact")]
    assert upload["if"] == "always()"
    assert {"reports/", "metrics/"} <= set(upload["with"]["path"].split())


def test_workflow_installs_like_the_readme() -> None:
    """`make install` after the README's torch-from-the-CPU-index command, in both jobs."""
    wf = load_workflow()
    readme = (REPO / "README.md").read_text()
    m = re.search(r"pip install --index-url (\S+) torch==2\.13\.0", readme)
    assert m, "README no longer documents the torch CPU-index install"
    assert wf["env"]["TORCH_INDEX"] == m.group(1)
    assert "make install" in (REPO / "README.md").read_text() or "install:" in (REPO / "Makefile").read_text()
    for name, job in wf["jobs"].items():
        runs = "\n".join(step_runs(job))
        torch_line = re.search(r"pip install -q --index-url \"\$TORCH_INDEX\" torch==2\.13\.0", runs)
        assert torch_line, f"{name}: torch is not installed from the PyTorch CPU index first"
        follow = "make install" if name == "gate" else "make test"
        assert runs.index(torch_line.group(0)) < runs.index(follow), name
    assert "make test" in step_runs(wf["jobs"]["tests"])


def test_structural_checks_fail_on_a_broken_workflow(monkeypatch: pytest.MonkeyPatch) -> None:
    """The structural checks above reject a workflow without full history or without the gate."""
    good = load_workflow()
    bad_history = copy.deepcopy(good)
    bad_history["jobs"]["gate"]["steps"][0]["with"]["fetch-depth"] = 1
    bad_gate = copy.deepcopy(good)
    bad_gate["jobs"]["gate"]["steps"] = [s for s in bad_gate["jobs"]["gate"]["steps"]
                                         if "ci-gate" not in s.get("run", "")]
    for bad in (bad_history, bad_gate):
        monkeypatch.setattr(sys.modules[__name__], "load_workflow", lambda bad=bad: bad)
        with pytest.raises(AssertionError):
            test_gate_job_runs_install_pipeline_and_ci_gate()
