"""`mergesmith evolve` on the bundled tiny family: genome by hand, batched scoring against one-by-one, bad configs
refused before any worker, a search that survives SIGKILL, and the same journal on a real two-node Ray cluster."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from mergesmith.cli import main
from mergesmith.demo import tiny_dir

TINY = tiny_dir()
ENV = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
ARGS = ["--max-fevals", "8", "--force-population-size", "4", "--random-seed", "3", "-q"]


def config_text(**extra) -> str:
    body = {
        "genome": {
            "models": [str(TINY / s) for s in ("addition", "reverse", "sort")],
            "merge_method": "della_linear",
            "base_model": str(TINY / "base"),
            "layer_granularity": 2,
            "parameters": {"epsilon": 0.05},
        },
        "tasks": ["tiny:addition", "tiny:reverse", {"name": "tiny:sort", "weight": 1.0}],
        "limit": 4,
    }
    body.update(extra)
    return json.dumps(body)  # JSON is YAML


def run_cli(args):
    try:
        main([str(a) for a in args])
    except SystemExit as e:
        return e.code
    return 0


def entries(storage: Path):
    """The journal's candidates without what depends on the machine (times, worker ids)."""
    out = []
    for line in (storage / "journal.jsonl").read_text().splitlines()[1:]:
        d = json.loads(line)
        for k in ("seconds", "worker", "time"):
            d.pop(k)
        out.append(d)
    return out


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    p = tmp_path_factory.mktemp("cfg") / "evolve.yml"
    p.write_text(config_text())
    return p


@pytest.fixture(scope="module")
def local_run(config, tmp_path_factory):
    """An uninterrupted search in this process (one worker)."""
    storage = tmp_path_factory.mktemp("local") / "st"
    assert run_cli(["evolve", config, "--storage", storage, "--workers", "1", *ARGS]) == 0
    return storage


# ------------------------------------------------------------------------------------------- evaluation


def test_batched_scoring_matches_one_prompt_at_a_time():
    """Left-padded batched greedy decoding with a KV cache gives each prompt the tokens transformers' own generate
    gives it alone; batched teacher-forced accuracy is the one-by-one accuracy."""
    from mergesmith.evaluate import Task, encode, exact_match, greedy, load, teacher_forced, token_accuracy
    from mergesmith.skills import eval_set

    model, tok = load(TINY / "reverse")
    tasks = [Task(s, p, a) for s in ("reverse", "sort", "addition") for p, a in eval_set(s)[:3]]
    enc = encode(tok, tasks)
    batched = greedy(model, [e.prompt for e in enc], 16, tok.pad_token_id, tok.eos_token_id)
    for e, row in zip(enc, batched):
        alone = model.generate(
            input_ids=torch.tensor([e.prompt]),
            max_new_tokens=16,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        )[0, len(e.prompt) :].tolist()
        if tok.eos_token_id in alone:
            alone = alone[: alone.index(tok.eos_token_id)]
        assert row == alone
    assert exact_match(model, tok, tasks, batch=9) == exact_match(model, tok, tasks, batch=1)
    padded, alone = teacher_forced(model, tok, enc, batch=9), teacher_forced(model, tok, enc, batch=1)
    for skill, v in alone.items():  # perplexity moves with any change of what a prompt attends to
        assert padded[skill]["perplexity"] == pytest.approx(v["perplexity"], rel=1e-5)
    assert token_accuracy(model, tok, tasks, batch=9) == token_accuracy(model, tok, tasks, batch=1)
    assert exact_match(model, tok, tasks)["reverse"] == 1.0  # the expert does its skill


# ------------------------------------------------------------------------------------------- genome


def test_genome_maps_a_vector_to_mergekit_slices():
    from mergesmith.evolve.genome import Genome

    g = Genome(
        models=("a", "b"),
        merge_method="ties",
        num_layers=4,
        base_model="base",
        layer_granularity=2,
        filters=("mlp",),
        method_shared=("normalize", "int8_mask", "lambda"),
    )
    assert g.shape == (2, 2, 2, 2) and g.size == 16
    x = np.arange(16, dtype=float) / 10 - 0.35  # negative weights become positive, densities fold into [0, 1]
    r = g.recipe(x)
    assert r["merge_method"] == "ties" and r["base_model"] == "base" and r["dtype"] == "bfloat16"
    assert r["parameters"] == {"normalize": True, "int8_mask": True}
    s0, s1 = r["slices"]
    assert [src["model"] for src in s0["sources"]] == ["a", "b", "base"]
    assert s1["sources"][0]["layer_range"] == [2, 4] and "parameters" not in s1["sources"][2]
    # layout (group, model, set, param): group 1, model 0 -> offset 8; set 0 = "mlp", set 1 = the rest
    w = s1["sources"][0]["parameters"]["weight"]
    d = s1["sources"][0]["parameters"]["density"]
    assert w == [{"filter": "mlp", "value": pytest.approx(0.45)}, {"filter": None, "value": pytest.approx(0.65)}]
    assert d == [{"filter": "mlp", "value": 0.55}, {"filter": None, "value": 0.75}] or d == [
        {"filter": "mlp", "value": pytest.approx(0.55)},
        {"filter": None, "value": pytest.approx(0.75)},
    ]
    assert s0["sources"][0]["parameters"]["weight"][0]["value"] == pytest.approx(0.35)  # |-0.35|
    start = Genome(models=("a", "b", "c"), merge_method="linear", num_layers=4).initial()
    assert list(start) == [pytest.approx(1 / 3)] * 3  # one group, weights only


def test_candidates_merge_in_memory_to_the_merge_bytes(config, tmp_path):
    """A worker's merge (inputs served from memory) is mergesmith.merge_in_memory's, tensor for tensor."""
    import mergesmith
    from mergesmith.evolve.config import load_config
    from mergesmith.evolve.search import make_genome
    from mergesmith.evolve.worker import merged_tensors

    g = make_genome(load_config(config))
    recipe = g.recipe(np.random.default_rng(0).uniform(0, 1, g.size))
    store = {}
    for _ in range(2):  # the second time every input comes from memory
        mine = merged_tensors(recipe, store, seed=5)
        ref = mergesmith.merge_in_memory(recipe, mergesmith.MergeOptions(seed=5))
        assert mine.keys() == ref.keys() and all(torch.equal(mine[k], ref[k]) for k in ref)
    assert store


# ------------------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    "body, says",
    [
        ({"genome": {"models": ["x"], "merge_method": "tiess"}, "tasks": ["tiny:sort"]}, "did you mean 'ties'"),
        ({"tasks": []}, "no tasks"),
        ({"tasks": [{"name": "t", "search": "notjsonl.txt"}]}, "notjsonl.txt:1"),
        ({"tasks": [{"name": "tiny:sort", "weight": -1}]}, "weight"),
        ({"tasks": [{"name": "tiny:sort", "metric": "bleu"}]}, "metric"),
        ({"tasks": ["tiny:sortt"]}, "tiny:sort"),
        ({"limit": 0}, "limit"),
        ({"score": "mean"}, "score: 'mean': use sum or gap"),
        ({"genome": {"models": ["x", "y"], "merge_method": "linear"}, "score": "gap"}, "genome.base_model"),
    ],
)
def test_bad_configs_exit_2_before_any_worker(tmp_path, capsys, body, says):
    data = json.loads(config_text())
    data.update(body)
    (tmp_path / "notjsonl.txt").write_text("prompt,answer\n1,2\n")
    cfg = tmp_path / "bad.yml"
    cfg.write_text(json.dumps(data))
    storage = tmp_path / "st"
    assert run_cli(["evolve", cfg, "--storage", storage, "--workers", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and says in err[0], err
    assert not storage.exists()  # refused before anything was started or written


def test_bad_options_exit_2(config, tmp_path, capsys):
    for extra in (["--max-fevals", "0"], ["--sigma0", "-1"], ["--vllm"]):
        assert run_cli(["evolve", config, "--storage", tmp_path / "st", "--workers", "1", *extra]) == 2
        assert capsys.readouterr().err.startswith("error: ")
    assert not (tmp_path / "st").exists()


# ------------------------------------------------------------------------------------------- a search


def test_search_journal_best_yml_and_rerun(local_run, tmp_path):
    """8 candidates in index order; best.yml is the best journal entry's recipe and `mergesmith run` of it scores
    what the journal says; the report compares it with the start recipe on both splits."""
    from mergesmith.evaluate import Task, load, token_accuracy
    from mergesmith.evolve.tasks import TINY_SEARCH_SEED
    from mergesmith.skills import training_examples

    got = entries(local_run)
    assert [e["index"] for e in got] == list(range(8))
    best = max(got, key=lambda e: (e["score"], -e["index"]))
    import yaml

    assert yaml.safe_load((local_run / "best.yml").read_text()) == best["recipe"]
    out = tmp_path / "merged"
    assert run_cli(["run", local_run / "best.yml", out, "--seed", "3", "-q"]) == 0
    model, tok = load(out)
    total = 0.0
    for skill in ("addition", "reverse", "sort"):  # the search split: 4 training prompts per skill
        tasks = [Task(skill, p, a) for p, a in training_examples(skill, 4, TINY_SEARCH_SEED)]
        total += token_accuracy(model, tok, tasks)[skill]
    assert total == pytest.approx(best["score"], abs=1e-12)
    report = json.loads((local_run / "report.json").read_text())
    names = [r["name"] for r in report["rows"]]
    assert names[-2:] == ["start", f"best (#{best['index']})"]
    assert report["rows"][-1]["score"] == pytest.approx(best["score"], abs=1e-12)
    assert (local_run / "scores.svg").read_text().startswith("<svg")


def test_killed_search_resumes_without_scoring_twice(config, local_run, tmp_path, monkeypatch):
    storage = tmp_path / "st"
    cmd = [
        sys.executable,
        "-m",
        "mergesmith",
        "evolve",
        str(config),
        "--storage",
        str(storage),
        "--workers",
        "1",
        *ARGS,
    ]
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    journal = storage / "journal.jsonl"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and p.poll() is None:
        if journal.exists() and len(journal.read_text().splitlines()) >= 1 + 3:
            break
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    done = len(journal.read_text().splitlines()) - 1
    assert 3 <= done < 8, "the search was not interrupted mid-way"
    from mergesmith.evolve.worker import Scorer

    scored, run = [], Scorer.run
    monkeypatch.setattr(Scorer, "run", lambda self, job: scored.append(job["index"]) or run(self, job))
    assert run_cli(["evolve", config, "--storage", storage, "--workers", "1", *ARGS]) == 0
    assert [i for i in scored if isinstance(i, int)] == list(range(done, 8))  # only what the journal lacked
    assert entries(storage) == entries(local_run)  # each index once, the same candidates and scores
    assert (storage / "best.yml").read_text() == (local_run / "best.yml").read_text()


def test_other_settings_in_the_same_storage_are_refused(config, local_run, tmp_path, capsys):
    storage = tmp_path / "st"
    shutil.copytree(local_run, storage)
    assert run_cli(["evolve", config, "--storage", storage, "--workers", "1", *ARGS[:-3], "--random-seed", "4"]) == 2
    assert "random_seed" in capsys.readouterr().err
    gap = tmp_path / "gap.yml"  # the same search scored by gap: another search
    gap.write_text(config_text(score="gap"))
    assert run_cli(["evolve", gap, "--storage", storage, "--workers", "1", *ARGS]) == 2
    assert "score" in capsys.readouterr().err.split("changed: ")[1]


# ------------------------------------------------------------------------------------------- score: gap

SKILLS = ("addition", "reverse", "sort")
GAP_WEIGHTS = {"addition": 1.0, "reverse": 2.0, "sort": 0.5}


def search_split_accuracy(path: Path):
    """{skill: answer-token accuracy} of a model folder on the search split (4 training prompts per skill), by
    mergesmith.evaluate on the folder itself."""
    from mergesmith.evaluate import Task, load, token_accuracy
    from mergesmith.evolve.tasks import TINY_SEARCH_SEED
    from mergesmith.skills import training_examples

    model, tok = load(path)
    return {
        s: token_accuracy(model, tok, [Task(s, p, a) for p, a in training_examples(s, 4, TINY_SEARCH_SEED)])[s]
        for s in SKILLS
    }


def gap_by_hand(acc, base, experts) -> float:
    """Sum over skills of weight x (v - base) / (best expert - base), or weight x v where the gap is not positive."""
    total = 0.0
    for s in SKILLS:
        top = max(e[s] for e in experts)
        total += GAP_WEIGHTS[s] * ((acc[s] - base[s]) / (top - base[s]) if top > base[s] else acc[s])
    return total


def test_gap_fitness_on_hand_values():
    """Each task counts its share of the base-to-best-input gap; perplexity as -ln before the division; a task no
    input model improves counts its raw value."""
    import math

    from mergesmith.evolve.tasks import fitness

    specs = [
        {"name": "a", "metric": "token_accuracy", "weight": 1.0},
        {"name": "p", "metric": "perplexity", "weight": 2.0},
        {"name": "z", "metric": "exact_match", "weight": 0.5},
    ]
    base = {"a": {"token_accuracy": 0.6}, "p": {"perplexity": 50.0}, "z": {"exact_match": 0.3}}
    models = {
        "m1": {"a": {"token_accuracy": 0.9}, "p": {"perplexity": 20.0}, "z": {"exact_match": 0.2}},
        "m2": {"a": {"token_accuracy": 0.7}, "p": {"perplexity": 10.0}, "z": {"exact_match": 0.1}},
    }
    cand = {"a": {"token_accuracy": 0.75}, "p": {"perplexity": 25.0}, "z": {"exact_match": 0.25}}
    want = 1.0 * 0.15 / 0.3 + 2.0 * math.log(2) / math.log(5) + 0.5 * 0.25
    assert fitness(specs, cand, {"base": base, "models": models}) == pytest.approx(want, abs=1e-12)
    assert fitness(specs, cand) == pytest.approx(0.75 - 2 * math.log(25) + 0.5 * 0.25, abs=1e-12)


def test_gap_score_is_each_tasks_share_of_its_gap_and_survives_a_rerun(tmp_path):
    """With `score: gap` the base and expert scores (measured before the search, on the search split) are in the
    journal's header, each candidate's score is the weighted sum of its gap shares worked out here from mergesmith
    eval's numbers, and the report's search column is that score. A rerun scores new candidates with the header's
    numbers, not new ones."""
    cfg = tmp_path / "gap.yml"
    cfg.write_text(config_text(score="gap", tasks=[{"name": f"tiny:{s}", "weight": w} for s, w in GAP_WEIGHTS.items()]))
    storage = tmp_path / "st"
    args = ["evolve", cfg, "--storage", storage, "--workers", "1", "--force-population-size", "4", "--random-seed", "3"]
    assert run_cli([*args, "--max-fevals", "4", "-q"]) == 0
    base = search_split_accuracy(TINY / "base")
    experts = [search_split_accuracy(TINY / s) for s in SKILLS]
    assert all(max(e[s] for e in experts) > base[s] for s in SKILLS)  # every skill has a gap to close
    lines = (storage / "journal.jsonl").read_text().splitlines()
    head = json.loads(lines[0])
    assert {t: v["token_accuracy"] for t, v in head["baseline"]["base"].items()} == pytest.approx(
        {f"tiny:{s}": base[s] for s in SKILLS}, abs=1e-12
    )
    got = entries(storage)
    assert [e["index"] for e in got] == [0, 1, 2, 3]
    for e in got:
        acc = {s: e["scores"][f"tiny:{s}"]["token_accuracy"] for s in SKILLS}
        assert e["score"] == pytest.approx(gap_by_hand(acc, base, experts), abs=1e-12)
    report = json.loads((storage / "report.json").read_text())
    best = max(got, key=lambda e: (e["score"], -e["index"]))
    assert report["score"] == "gap" and "| gap score" in report["table"]
    assert report["rows"][0]["name"] == "base" and report["rows"][0]["score"] == pytest.approx(0, abs=1e-12)
    assert report["rows"][-1]["score"] == pytest.approx(best["score"], abs=1e-12)
    # a rerun with more candidates uses the header's baseline: edited here, it is what candidates 4 to 7 are scored by
    for v in head["baseline"]["base"].values():
        v["token_accuracy"] = 0.0
    (storage / "journal.jsonl").write_text("\n".join([json.dumps(head), *lines[1:]]) + "\n")
    assert run_cli([*args, "--max-fevals", "8", "-q"]) == 0
    again = entries(storage)
    assert again[:4] == got
    for e in again[4:]:
        acc = {s: e["scores"][f"tiny:{s}"]["token_accuracy"] for s in SKILLS}
        assert e["score"] == pytest.approx(gap_by_hand(acc, dict.fromkeys(SKILLS, 0.0), experts), abs=1e-12)


# ------------------------------------------------------------------------------------------- Ray


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_cluster():
    """A head node and a second node, one CPU each, as separate `ray start` processes; `ray stop` after."""
    pytest.importorskip("ray")
    ray_bin = str(Path(sys.executable).parent / "ray")
    temp = tempfile.mkdtemp(prefix="msray", dir="/tmp")
    port = _free_port()
    common = ["--num-cpus=1", "--disable-usage-stats"]
    try:
        subprocess.run(
            [ray_bin, "start", "--head", f"--port={port}", f"--temp-dir={temp}", "--include-dashboard=false", *common],
            env=ENV,
            check=True,
            capture_output=True,
            timeout=120,
        )
        address = f"127.0.0.1:{port}"
        subprocess.run(
            [ray_bin, "start", f"--address={address}", *common], env=ENV, check=True, capture_output=True, timeout=120
        )
        yield address
    finally:
        subprocess.run([ray_bin, "stop", "--force"], env=ENV, capture_output=True, timeout=120)
        shutil.rmtree(temp, ignore_errors=True)


def test_ray_cluster_gives_the_local_journal_even_when_a_worker_dies(config, local_run, ray_cluster, tmp_path):
    """Two nodes, two actors: the journal is the one-worker local run's (candidate order, not completion order),
    and a worker killed mid-search is replaced and its candidate scored again."""
    storage = tmp_path / "st"
    cmd = [
        sys.executable,
        "-m",
        "mergesmith",
        "evolve",
        str(config),
        "--storage",
        str(storage),
        "--ray-address",
        ray_cluster,
        *ARGS,
    ]
    p = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    journal = storage / "journal.jsonl"
    killed = None
    deadline = time.monotonic() + 150
    while time.monotonic() < deadline and p.poll() is None and killed is None:
        lines = journal.read_text().splitlines() if journal.exists() else []
        if len(lines) >= 2:
            killed = int(json.loads(lines[1])["worker"].rsplit(":", 1)[1])
            os.kill(killed, signal.SIGKILL)
        time.sleep(0.05)
    out, err = p.communicate(timeout=240)
    assert p.returncode == 0, err
    assert killed is not None
    assert entries(storage) == entries(local_run)
    workers = {json.loads(x)["worker"] for x in journal.read_text().splitlines()[1:]}
    assert len(workers) >= 2 and "worker died" in err


# ------------------------------------------------------------------------------------------- lm-eval

LM_TASK = """task: tiny_sums
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: choices
doc_to_target: gold
metric_list:
  - metric: acc
"""


def test_lm_eval_task_runs_on_the_in_memory_model(tmp_path, monkeypatch, capsys):
    """A local lm-eval task (a task YAML and a JSONL made here) scores the worker's in-memory model as lm-eval scores
    the model folder itself; a misspelt task is refused before any worker starts. Skips without lm-eval (the
    `evolve` extra)."""
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    from mergesmith.evolve.worker import Scorer

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    docs = [
        {
            "question": f"What is {a} + {b}?",
            "choices": [f"{a} + {b} makes {a + b}", f"{a} + {b} makes {a + b + 3}"],
            "gold": 0,
        }
        for a, b in ((1, 2), (3, 4), (5, 2), (6, 1), (2, 2), (7, 1))
    ]
    data = tmp_path / "sums.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    tasks_dir = tmp_path / "tasks"
    tasks_dir.mkdir()
    (tasks_dir / "tiny_sums.yaml").write_text(LM_TASK.format(data=data))
    spec = {
        "name": "tiny_sums",
        "kind": "lm_eval",
        "weight": 1.0,
        "metric": "acc,none",
        "lm_eval": {
            "task": "tiny_sums",
            "include_path": [str(tasks_dir)],
            "limit": None,
            "num_fewshot": None,
            "apply_chat_template": False,
            "fewshot_as_multiturn": False,
            "seed": 0,
        },
    }
    scorer = Scorer({"skeleton": str(TINY / "base"), "tasks": [spec], "seed": 0, "threads": 1})
    mine = scorer.run({"index": 0, "model": str(TINY / "addition")})
    ref = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={TINY / 'addition'},dtype=float32,device=cpu",
        tasks=["tiny_sums"],
        task_manager=TaskManager(include_path=str(tasks_dir)),
        log_samples=False,
        bootstrap_iters=0,
    )
    assert mine["scores"]["tiny_sums"]["acc,none"] == ref["results"]["tiny_sums"]["acc,none"]
    assert mine["score"] == ref["results"]["tiny_sums"]["acc,none"]
    capsys.readouterr()
    cfg = tmp_path / "cfg.yml"
    cfg.write_text(config_text(tasks=[{"name": "tiny_sumz", "metric": "acc,none"}]))
    code = run_cli(["evolve", cfg, "--storage", tmp_path / "st", "--workers", "1", "--task-search-path", tasks_dir])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "did you mean 'tiny_sums'" in err[0]
