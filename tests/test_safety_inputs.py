"""Every file mergesmith reads from a model folder, an adapter or a recipe is hostile: a flaw is one `error:` line
and exit 2 before any work, a link never leads out of its folder (except a Hugging Face cache snapshot's links to
its own repository's blobs), nothing blocks, nothing runs, nothing foreign lands in the output."""

import json
import os
import pickle
import shutil
import signal
import struct
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import hub_cache, make_mistral
from mergesmith.cli import main
from mergesmith.errors import MergeError
from mergesmith.io.index import index_model, read_safetensors_header, safe_member

RECIPE = """merge_method: task_arithmetic
base_model: {base}
models:
  - model: {ft}
    parameters:
      weight: 0.5
dtype: bfloat16
"""
SECRET = "hf_SECRETTOKEN123"


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A base sharded in several files and a fine-tune of it in one file."""
    root = tmp_path_factory.mktemp("pair")
    sd = make_mistral(root / "base", seed=0, shard="60KB")
    make_mistral(root / "ft", seed=1, from_state=sd, noise=0.02)
    assert len(list((root / "base").glob("model-*.safetensors"))) > 1
    return root / "base", root / "ft"


@pytest.fixture
def w(tmp_path, pair):
    """Fresh copies of the pair, a recipe merging them, and a secret file outside every folder."""
    base = Path(shutil.copytree(pair[0], tmp_path / "base"))
    ft = Path(shutil.copytree(pair[1], tmp_path / "ft"))
    recipe = tmp_path / "recipes" / "recipe.yml"
    recipe.parent.mkdir()
    recipe.write_text(RECIPE.format(base=base, ft=ft))
    secret = tmp_path / "home" / ".cache" / "huggingface" / "token"
    secret.parent.mkdir(parents=True)
    secret.write_text(SECRET)
    return SimpleNamespace(base=base, ft=ft, recipe=recipe, root=tmp_path, out=tmp_path / "out", secret=secret)


class Blocked(BaseException):
    """Raised in a read that blocks; a BaseException, so that no `except OSError` swallows it."""


@pytest.fixture(autouse=True)
def no_hang():
    """A read that blocks (a FIFO) fails the test instead of hanging the suite."""

    def boom(*_):
        signal.alarm(5)  # and the next one, should this one be caught anyway
        raise Blocked("a read blocked")

    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def cli(*args):
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    return e.value.code


def refused(capsys, *args) -> str:
    """Run the CLI; it must exit 2 with exactly one line (besides warnings), `error: ...`."""
    code = cli(*args)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("warning: ")]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def refused_before_work(capsys, w, *extra) -> str:
    """Both `plan` and `run` refuse the recipe with the same line, and `run` wrote nothing."""
    msg = refused(capsys, "plan", w.recipe, *extra)
    assert refused(capsys, "run", w.recipe, w.out, "--quiet", *extra) == msg
    assert not w.out.exists() and not Path(str(w.out) + ".partial").exists()
    return msg


def edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    data = change(data)
    path.unlink()  # a plain file again, also where a Hub cache had a link
    path.write_text(json.dumps(data))


def shards(folder: Path):
    return sorted(folder.glob("model-*.safetensors"))


def output_files(out: Path):
    """The output's files that depend on the inputs' bytes only (the card and recipe copy name the references)."""
    return {
        p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.name not in ("README.md", "mergesmith_config.yml")
    }


# ------------------------------------------------------------------------------------------ Hugging Face cache


def test_sharded_model_in_hub_cache_merges_like_a_plain_folder(tmp_path, pair, capsys):
    base, ft = pair
    cache = tmp_path / "cache"
    snap = hub_cache(cache, "org/name", Path(shutil.copytree(base, tmp_path / "copy")))
    assert (snap / "model.safetensors.index.json").is_symlink() and len(shards(snap)) > 1
    assert os.readlink(shards(snap)[0]).startswith("../../blobs/")
    hub, plain = tmp_path / "hub.yml", tmp_path / "plain.yml"
    hub.write_text(RECIPE.format(base="org/name", ft=ft))
    plain.write_text(RECIPE.format(base=base, ft=ft))
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "MERGESMITH_MALLOC": "0"}
    r = subprocess.run(
        [sys.executable, "-m", "mergesmith", "run", str(hub), str(tmp_path / "a"), "--quiet", "--seed", "1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert cli("run", plain, tmp_path / "b", "--quiet", "--seed", "1") == 0
    a, b = output_files(tmp_path / "a"), output_files(tmp_path / "b")
    assert "model.safetensors" in a and "tokenizer.json" in a and "generation_config.json" in a
    assert a == b


@pytest.fixture
def snap(tmp_path, pair):
    """The sharded base laid out as a Hub cache repository, and a second repository beside it."""
    cache = tmp_path / "cache"
    s = hub_cache(cache, "org/name", Path(shutil.copytree(pair[0], tmp_path / "copy")))
    other = hub_cache(cache, "org/other", Path(shutil.copytree(pair[0], tmp_path / "copy2")))
    return s, other


def _relink(link: Path, target) -> None:
    link.unlink()
    link.symlink_to(target)


@pytest.mark.parametrize("escape", ["absolute", "other_repo", "elsewhere", "dotdot_in_index"])
def test_hub_cache_links_lead_only_to_their_own_blobs(snap, tmp_path, escape):
    s, other = snap
    assert len(index_model("org/name", s).tensors) > 0  # as laid out: accepted
    first = shards(s)[0]
    copy = tmp_path / "elsewhere" / first.name  # a valid shard, only in the wrong place
    copy.parent.mkdir()
    shutil.copyfile(first, copy)
    if escape == "absolute":
        _relink(first, copy)
    elif escape == "other_repo":
        _relink(first, os.path.relpath(shards(other)[0].resolve(), first.parent))
    elif escape == "elsewhere":
        _relink(first, os.path.relpath(copy, first.parent))
    else:  # the index names a file of the repository's blobs directly, by a path with ..
        shutil.copyfile(first, first.resolve().parent / "x.safetensors")
        edit_json(
            s / "model.safetensors.index.json",
            lambda d: {
                **d,
                "weight_map": {
                    k: "../../blobs/x.safetensors" if v == first.name else v for k, v in d["weight_map"].items()
                },
            },
        )
    with pytest.raises(MergeError, match="outside the model folder|not a file name inside") as e:
        index_model("org/name", s)
    assert "\n" not in str(e.value)


def test_hub_revision_cannot_leave_the_cache(tmp_path, pair, capsys, monkeypatch):
    from huggingface_hub import constants

    cache = tmp_path / "cache"
    hub_cache(cache, "org/name", Path(shutil.copytree(pair[0], tmp_path / "copy")))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # a ref whose content names a folder outside the snapshots
    (cache / "models--org--name" / "refs" / "evil").write_text(f"../../../{pair[1].name}")
    r = tmp_path / "r.yml"
    r.write_text(RECIPE.format(base="org/name@evil", ft=pair[1]))
    assert "does not hold a commit hash" in refused(capsys, "plan", r)
    r.write_text(RECIPE.format(base="org/name@../../x", ft=pair[1]))
    assert "is not a branch, tag or commit name" in refused(capsys, "plan", r)


# ------------------------------------------------------------------------------------- files named by an index


def test_safe_member_accepts_only_regular_files_inside(tmp_path):
    folder = tmp_path / "m"
    (folder / "sub").mkdir(parents=True)
    (folder / "ok.safetensors").write_bytes(b"x")
    (folder / "dir.safetensors").mkdir()
    os.mkfifo(folder / "pipe.safetensors")
    (tmp_path / "secret").write_text(SECRET)
    (folder / "link.safetensors").symlink_to(tmp_path / "secret")
    (folder / "sub" / "inner").write_bytes(b"y")
    (folder / "in.safetensors").symlink_to("sub/inner")
    (folder / "loop1.safetensors").symlink_to("loop2.safetensors")
    (folder / "loop2.safetensors").symlink_to("loop1.safetensors")
    assert safe_member(folder, "ok.safetensors") == (folder / "ok.safetensors").resolve()
    assert safe_member(folder, "in.safetensors") == (folder / "sub" / "inner").resolve()
    for name in [
        "dir.safetensors",
        "pipe.safetensors",
        "link.safetensors",
        "loop1.safetensors",
        "../secret",
        "sub/../../secret",
        str(tmp_path / "secret"),
        "missing.safetensors",
        "",
        5,
        None,
    ]:
        with pytest.raises(MergeError) as e:
            safe_member(folder, name)
        assert "\n" not in str(e.value)


def test_device_file_in_a_model_folder_is_refused(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    try:
        os.mknod(folder / "dev.safetensors", 0o600 | 0o020000, os.makedev(1, 5))  # a character device, like /dev/zero
    except (PermissionError, AttributeError):
        pytest.skip("cannot create a device file here")
    with pytest.raises(MergeError, match="not a regular file"):
        safe_member(folder, "dev.safetensors")
    with pytest.raises(MergeError, match="not a regular file"):
        index_model("m", folder)


@pytest.mark.parametrize("what", ["fifo_shard", "dir_shard", "fifo_config", "fifo_index"])
def test_fifos_and_folders_in_a_model_are_refused_without_blocking(w, capsys, what):
    first = shards(w.base)[0]
    if what == "fifo_shard":
        first.unlink()
        os.mkfifo(first)
    elif what == "dir_shard":
        first.unlink()
        first.mkdir()
    elif what == "fifo_config":
        (w.base / "config.json").unlink()
        os.mkfifo(w.base / "config.json")
    else:
        (w.base / "model.safetensors.index.json").unlink()
        os.mkfifo(w.base / "model.safetensors.index.json")
    assert "not a regular file" in refused_before_work(capsys, w)


def test_single_file_model_linked_from_elsewhere_is_refused(w, capsys):
    elsewhere = w.root / "elsewhere.safetensors"
    shutil.move(w.ft / "model.safetensors", elsewhere)
    (w.ft / "model.safetensors").symlink_to(elsewhere)
    assert "leads outside the model folder" in refused_before_work(capsys, w)


def test_symlinked_model_folder_is_fine(w):
    link = w.root / "link"
    link.symlink_to(w.base)
    assert index_model("b", link).tensors.keys() == index_model("b", w.base).tensors.keys()


# ------------------------------------------------------------------ malformed but valid JSON: one line, not a bug


def _wm(value):
    return lambda d: {**d, "weight_map": {k: value for k in d["weight_map"]}}


@pytest.mark.parametrize(
    "file,change,expect",
    [
        ("model.safetensors.index.json", _wm(5), "not a .safetensors file name"),
        ("model.safetensors.index.json", lambda d: [d], "not an object"),
        ("model.safetensors.index.json", lambda d: {"weight_map": [1]}, "no 'weight_map'"),
        ("model.safetensors.index.json", _wm("model.safetensors.index.json"), "not a .safetensors file name"),
        ("config.json", lambda d: {**d, "hidden_size": [256]}, "'hidden_size' is [256], not a whole number"),
        ("config.json", lambda d: {**d, "num_hidden_layers": "2"}, "'num_hidden_layers'"),
        ("config.json", lambda d: {**d, "vocab_size": -1}, "'vocab_size'"),
        ("config.json", lambda d: {**d, "tie_word_embeddings": "yes"}, "'tie_word_embeddings'"),
        ("config.json", lambda d: {**d, "architectures": 5}, "'architectures'"),
        ("config.json", lambda d: {**d, "architectures": [5]}, "'architectures'"),
        ("config.json", lambda d: [d], "not an object"),
        ("tokenizer_config.json", lambda d: [d], "not an object"),
        ("tokenizer.json", lambda d: list(d), "not an object"),
    ],
)
def test_malformed_json_is_one_line_before_work(w, capsys, file, change, expect):
    edit_json(w.base / file, change)
    msg = refused_before_work(capsys, w)
    assert expect in msg and file in msg


def test_invalid_tokenizer_config_is_refused_before_the_merge(w, capsys):
    (w.base / "tokenizer_config.json").write_text("{not json")
    with open(w.recipe, "a") as f:
        f.write("chat_template: chatml\n")
    assert "tokenizer_config.json: not valid JSON" in refused_before_work(capsys, w)


def test_deeply_nested_json_is_one_line(w, capsys):
    (w.base / "config.json").write_text("[" * 100000 + "]" * 100000)
    assert "nested too deeply" in refused_before_work(capsys, w)


def test_huge_tokenizer_model_is_refused(w, capsys):
    with open(w.base / "tokenizer.model", "wb") as f:
        f.truncate(1 << 30)
    assert "too large for a tokenizer file" in refused_before_work(capsys, w)


@pytest.mark.parametrize("lie", ["config", "tensor_name"])
def test_layer_count_above_the_tensor_count_is_refused(w, capsys, lie):
    """A claimed 10^9 layers would have the planner walk them all (it hung)."""
    if lie == "config":
        edit_json(w.ft / "config.json", lambda d: {**d, "num_hidden_layers": 10**9})
    else:
        f = w.ft / "model.safetensors"
        t = load_file(str(f))
        t["model.layers.999999999.extra.weight"] = torch.zeros(2)
        save_file(t, str(f), metadata={"format": "pt"})
    assert "layers, but the model holds only" in refused_before_work(capsys, w, "--allow-crimes")


def test_huge_config_is_refused_without_reading_it(w, capsys):
    with open(w.base / "config.json", "r+b") as f:
        f.truncate(1 << 30)  # sparse: 1 GiB that costs no disk
    assert "1024 MiB is too large for a JSON file" in refused_before_work(capsys, w)


# ------------------------------------------------------------------------------------------------ LoRA adapters


@pytest.fixture
def adapter(w):
    """A LoRA of rank 2 on layer 0's q_proj, applied to the fine-tune."""
    a = w.root / "adapter"
    a.mkdir()
    (a / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]})
    )
    pre = "base_model.model.model.layers.0.self_attn.q_proj"
    save_file(
        {f"{pre}.lora_A.weight": torch.randn(2, 64), f"{pre}.lora_B.weight": torch.randn(64, 2)},
        str(a / "adapter_model.safetensors"),
    )
    w.recipe.write_text(RECIPE.format(base=w.base, ft=f"{w.ft}+{a}"))
    return a


def test_adapter_as_laid_out_is_accepted(w, adapter, capsys):
    assert cli("plan", w.recipe) == 0


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("how", ["legacy", "zip"])
def test_pickled_code_in_an_adapter_never_runs(w, adapter, capsys, recwarn, how):
    marker = w.root / "pwned"
    (adapter / "adapter_model.safetensors").unlink()
    payload = {"x.lora_A.weight": _Evil(marker)}
    if how == "legacy":
        (adapter / "adapter_model.bin").write_bytes(pickle.dumps(payload))
    else:
        torch.save(payload, adapter / "adapter_model.bin")
    msg = refused_before_work(capsys, w)
    assert "weights_only=True" in msg
    assert not marker.exists()
    assert not [str(x.message) for x in recwarn if "pickle" in str(x.message)]  # Python would print them too


@pytest.mark.parametrize(
    "change,expect",
    [
        ({"r": "8"}, "'r' must be a whole number"),
        ({"r": 0}, "'r' must be a whole number"),
        ({"lora_alpha": "x"}, "'lora_alpha' must be a number"),
        ({"peft_type": 5}, "'peft_type' must be a name"),
        ({"use_rslora": "no"}, "'use_rslora' must be true or false"),
        ({"rank_pattern": [1]}, "'rank_pattern' must be an object"),
        ({"alpha_pattern": {"q_proj": "x"}}, "alpha_pattern['q_proj']"),
        ({"rank_pattern": {"(": 2}}, "not a regular expression"),
        ({"rank_pattern": {"(.*)*x": 2}}, "can take forever to match"),  # matching it hung
        ({"alpha_pattern": {".*.*.*.*x": 2}}, "can take forever to match"),
    ],
)
def test_adapter_config_with_wrong_types_is_one_line(w, adapter, capsys, change, expect):
    edit_json(adapter / "adapter_config.json", lambda d: {**d, **change})
    assert expect in refused_before_work(capsys, w)


@pytest.mark.parametrize(
    "case", ["list_config", "rank_mismatch", "rank_zero", "corrupt", "bin_not_tensors", "int_factor", "link_outside"]
)
def test_bad_adapter_files_are_one_line(w, adapter, capsys, case):
    pre = "base_model.model.model.layers.0.self_attn.q_proj"
    st = adapter / "adapter_model.safetensors"
    if case == "list_config":
        (adapter / "adapter_config.json").write_text("[]")
    elif case == "rank_mismatch":
        save_file({f"{pre}.lora_A.weight": torch.randn(2, 64), f"{pre}.lora_B.weight": torch.randn(64, 3)}, str(st))
    elif case == "rank_zero":
        save_file({f"{pre}.lora_A.weight": torch.randn(0, 64), f"{pre}.lora_B.weight": torch.randn(64, 0)}, str(st))
    elif case == "corrupt":
        st.write_bytes(st.read_bytes()[:-10])
    elif case == "bin_not_tensors":
        st.unlink()
        torch.save({f"{pre}.lora_A.weight": [1, 2]}, adapter / "adapter_model.bin")
    elif case == "int_factor":
        save_file(
            {
                f"{pre}.lora_A.weight": torch.ones(2, 64, dtype=torch.int32),
                f"{pre}.lora_B.weight": torch.ones(64, 2, dtype=torch.int32),
            },
            str(st),
        )
    else:
        shutil.move(st, w.root / "elsewhere.safetensors")
        st.symlink_to(w.root / "elsewhere.safetensors")
    assert "adapter" in refused_before_work(capsys, w)


# ------------------------------------------------------------------------------------------------ chat templates


def _with_template(w, spec: str) -> None:
    w.recipe.write_text(RECIPE.format(base=w.base, ft=w.ft) + f"chat_template: {json.dumps(spec)}\n")


def test_chat_template_path_to_a_secret_is_refused(w, capsys):
    _with_template(w, str(w.secret))
    msg = refused_before_work(capsys, w)
    assert "recipe.yml:8" in msg and SECRET not in msg


@pytest.mark.parametrize(
    "make", ["outside_jinja", "link_in_recipe_folder", "no_suffix_in_recipe_folder", "suffix_link_to_plain_file"]
)
def test_chat_template_files_are_sealed(w, capsys, make):
    rdir = w.recipe.parent
    if make == "outside_jinja":
        spec = w.root / "home" / "evil.jinja"
        spec.write_text(SECRET)
    elif make == "link_in_recipe_folder":
        spec = rdir / "t.jinja"
        spec.symlink_to(w.secret)
    elif make == "no_suffix_in_recipe_folder":
        spec = rdir / "token"
        spec.write_text(SECRET)
    else:
        (rdir / "token").write_text(SECRET)
        spec = rdir / "t.jinja"
        spec.symlink_to("token")
    _with_template(w, str(spec))
    msg = refused_before_work(capsys, w)
    assert "recipe.yml:8: chat_template" in msg


def test_chat_template_file_next_to_the_recipe_is_used(w):
    template = "{% for m in messages %}<<{{ m.content }}>>{% endfor %}"
    (w.recipe.parent / "mine.jinja").write_text(template)
    _with_template(w, "mine.jinja")  # relative: to the recipe's folder, from any working directory
    assert cli("run", w.recipe, w.out, "--quiet") == 0
    assert json.loads((w.out / "tokenizer_config.json").read_text())["chat_template"] == template


def test_chat_template_file_of_a_model_is_accepted(w):
    _with_template(w, str(w.ft / "chat_template.jinja"))
    assert cli("plan", w.recipe) == 0


def test_auto_template_does_not_follow_a_link_out_of_a_model(w, capsys):
    (w.ft / "chat_template.jinja").unlink()
    (w.ft / "chat_template.jinja").symlink_to(w.secret)
    _with_template(w, "auto")
    assert SECRET not in refused_before_work(capsys, w)


# -------------------------------------------------------------------- tokenizer and generation config, copied out


@pytest.mark.parametrize(
    "name", ["tokenizer_config.json", "tokenizer.json", "special_tokens_map.json", "chat_template.jinja"]
)
def test_tokenizer_file_linked_to_a_secret_is_refused(w, capsys, name):
    secret_json = w.root / "secret.json"
    secret_json.write_text(json.dumps({"token": SECRET}))
    target = secret_json if name.endswith(".json") else w.secret
    if (w.base / name).exists():
        (w.base / name).unlink()
    (w.base / name).symlink_to(target)
    msg = refused_before_work(capsys, w)
    assert "leads outside the model folder" in msg and name in msg


def test_tokenizer_merge_does_not_read_linked_files(w, capsys):
    secret_json = w.root / "secret.json"
    shutil.copyfile(w.ft / "tokenizer.json", secret_json)
    (w.ft / "tokenizer.json").unlink()
    (w.ft / "tokenizer.json").symlink_to(secret_json)
    with open(w.recipe, "a") as f:
        f.write("tokenizer_source: union\n")
    assert "leads outside the model folder" in refused_before_work(capsys, w)


def test_tokenizer_config_naming_a_file_outside_is_refused_for_a_tokenizer_merge(w, capsys):
    edit_json(w.ft / "tokenizer_config.json", lambda d: {**d, "tokenizer_file": str(w.secret)})
    with open(w.recipe, "a") as f:
        f.write("tokenizer_source: union\n")
    assert "tokenizer_file names" in refused_before_work(capsys, w)


def test_generation_config_linked_outside_is_not_copied(w, capsys):
    secret_json = w.root / "secret.json"
    secret_json.write_text(json.dumps({"token": SECRET}))
    (w.base / "generation_config.json").unlink()
    (w.base / "generation_config.json").symlink_to(secret_json)
    assert cli("run", w.recipe, w.out, "--quiet") == 0
    assert "the output has no generation_config.json" in capsys.readouterr().err
    assert not (w.out / "generation_config.json").exists()
    assert all(SECRET.encode() not in p.read_bytes() for p in w.out.iterdir())


# ----------------------------------------------------------------------------------------- safetensors headers


def _st_file(path: Path, header: dict, data: bytes = b"") -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


@pytest.mark.parametrize(
    "header,data,expect",
    [
        ({"t": {"dtype": "F32", "shape": [0, 1 << 62], "data_offsets": [0, 0]}}, b"", "bad shape"),
        ({"t": {"dtype": "F32", "shape": [1 << 32, 1 << 32], "data_offsets": [0, 4]}}, b"\0" * 4, "bytes stored"),
        ({"t": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4, "bad shape"),
        ({"t": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}}, b"\0" * 4, "bad shape"),
        ({"t": {"dtype": "F32", "shape": [1] * 40, "data_offsets": [0, 4]}}, b"\0" * 4, "bad shape"),
        ({"t": {"dtype": "F32", "shape": [1], "data_offsets": [0.0, 4]}}, b"\0" * 4, "bad data_offsets"),
    ],
)
def test_lying_safetensors_headers_are_refused(tmp_path, header, data, expect):
    _st_file(tmp_path / "model.safetensors", header, data)
    with pytest.raises(MergeError, match=expect):
        index_model("m", tmp_path)


def test_header_claiming_100_mb_is_refused_without_reading(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(struct.pack("<Q", 100 * 10**6) + b"{}")
    with pytest.raises(MergeError, match="header size 100000000 is impossible"):
        read_safetensors_header(f)


def test_tensor_in_two_shards_is_refused(w, capsys):
    a, b = shards(w.base)[:2]
    ta, tb = load_file(str(a)), load_file(str(b))
    dup = next(iter(ta))
    save_file({**tb, dup: ta[dup]}, str(b), metadata={"format": "pt"})
    msg = refused_before_work(capsys, w)
    assert f"tensor {dup} is in both" in msg


@pytest.mark.parametrize("lie", ["wrong_file", "ghost"])
def test_index_that_disagrees_with_the_files_is_refused(w, capsys, lie):
    index = w.base / "model.safetensors.index.json"
    wm = json.loads(index.read_text())["weight_map"]
    name = "model.norm.weight"
    other = next(f for f in sorted(set(wm.values())) if f != wm[name])
    if lie == "wrong_file":
        edit_json(index, lambda d: {**d, "weight_map": {**wm, name: other}})
    else:
        edit_json(index, lambda d: {**d, "weight_map": {**wm, "model.ghost.weight": other}})
    assert "the index puts tensor" in refused_before_work(capsys, w)


def test_empty_per_layer_list_in_config_does_not_break_a_sliced_merge(w):
    edit_json(w.base / "config.json", lambda d: {**d, "layer_types": []})
    w.recipe.write_text(
        f"merge_method: passthrough\nslices:\n  - sources:\n      - model: {w.base}\n"
        "        layer_range: [0, 1]\ndtype: bfloat16\n"
    )
    assert cli("run", w.recipe, w.out, "--quiet") == 0
    cfg = json.loads((w.out / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 1 and cfg["layer_types"] == []
