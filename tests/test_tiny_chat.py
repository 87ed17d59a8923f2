"""The shipped demo model (assets/tiny-chat): it loads, it is the format the runtime reads, and its
held-out loss is the one its model card and training report state."""
from __future__ import annotations

import json
import math
import random
import re
import sys

import pytest
import torch

from tools.train_tiny.batches import collate
from tools.train_tiny.checkpoint import ASSET_DIR
from tools.train_tiny.corpus import build_examples
from tools.train_tiny.evaluation import answer_loss, heldout_loss
from tools.train_tiny.heldout import heldout_encoded, read_heldout
from tools.train_tiny.locality import locality_stats

CARD = ASSET_DIR / "MODEL_CARD.md"


@pytest.fixture(scope="module")
def report():
    return json.loads((ASSET_DIR / "train_report.json").read_text())


@pytest.fixture(scope="module")
def shipped():
    from transformers import AutoTokenizer, MixtralForCausalLM
    torch.set_num_threads(2)
    tok = AutoTokenizer.from_pretrained(str(ASSET_DIR))
    model = MixtralForCausalLM.from_pretrained(str(ASSET_DIR), dtype=torch.float32).eval()
    return model, tok


def test_config_and_weights_are_hub_format():
    from safetensors import safe_open
    cfg = json.loads((ASSET_DIR / "config.json").read_text())
    assert cfg["model_type"] == "mixtral"
    assert cfg["dtype"] == "float16"
    assert cfg["num_local_experts"] == 8 and cfg["num_experts_per_tok"] == 2
    weights = ASSET_DIR / "model.safetensors"
    assert weights.stat().st_size < 50e6
    with safe_open(str(weights), "pt") as f:
        keys = set(f.keys())
        assert all(f.get_slice(k).get_dtype() == "F16" for k in keys)
        w1 = f.get_slice("model.layers.0.block_sparse_moe.experts.7.w1.weight").get_shape()
    assert w1 == [cfg["intermediate_size"], cfg["hidden_size"]]
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        assert p + "block_sparse_moe.gate.weight" in keys
        for proj in "qkvo":
            assert f"{p}self_attn.{proj}_proj.weight" in keys
        for e in range(cfg["num_local_experts"]):
            for w in ("w1", "w2", "w3"):
                assert f"{p}block_sparse_moe.experts.{e}.{w}.weight" in keys
    assert {"lm_head.weight", "model.embed_tokens.weight", "model.norm.weight"} <= keys
    assert not any("gate_up_proj" in k or "down_proj" in k for k in keys)


def test_tokenizer_and_chat_template(shipped):
    model, tok = shipped
    ids = tok.apply_chat_template([{"role": "user", "content": "What does len do?"}], tokenize=True)["input_ids"]
    assert ids[0] == tok.bos_token_id == model.config.bos_token_id
    assert tok.decode(ids) == "<s>[INST] What does len do? [/INST]"
    turn = tok.apply_chat_template([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                                   tokenize=True)["input_ids"]
    assert turn[-1] == tok.eos_token_id == model.config.eos_token_id
    assert len(tok) == model.config.vocab_size <= 8192


def test_heldout_loss_matches_report_and_card(shipped, report):
    model, tok = shipped
    enc, _ = heldout_encoded(ASSET_DIR, tok)
    assert len(enc) == report["data"]["heldout_turns_fit"]
    loss, n = heldout_loss(model, enc, tok.pad_token_id)
    assert n == report["data"]["heldout_answer_tokens"]
    assert loss == pytest.approx(report["heldout_loss"], abs=2e-3)
    card = re.search(r"held-out loss[^0-9]*([0-9]+\.[0-9]+)", CARD.read_text(), re.IGNORECASE)
    assert card, "the model card states no held-out loss"
    assert loss == pytest.approx(float(card.group(1)), abs=2e-3)
    # and the model is trained: far below a uniform guess over the vocabulary
    assert loss < 0.75 * math.log(model.config.vocab_size)


def test_answers_a_builtin_question(shipped):
    model, tok = shipped
    prompt = tok.apply_chat_template([{"role": "user", "content": "What does the built-in function len do?"}],
                                     tokenize=True)["input_ids"]
    out = model.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         max_new_tokens=24, do_sample=False, pad_token_id=tok.eos_token_id)
    text = tok.decode(out[0, len(prompt):], skip_special_tokens=True)
    assert "number of items" in text


def test_heldout_split_is_rebuilt_deterministically(report):
    if sys.version.split()[0] != report["python"]:
        pytest.skip(f"docstrings differ between Python versions (trained on {report['python']})")
    hp = report["hyperparameters"]
    _, held = build_examples(hp["seed"], hp["heldout_frac"])
    assert held == read_heldout(ASSET_DIR)


def test_training_data_does_not_depend_on_the_environment():
    """Defaults computed from the interpreter's path or a virtualenv read the same everywhere."""
    import platform
    import sysconfig

    from tools.train_tiny.corpus import _signature
    arch = _signature("platform.architecture", platform.architecture)
    assert arch.startswith("platform.architecture(executable=sys.executable,") and sys.executable not in arch
    if sys.platform == "linux":
        assert "scheme='posix_prefix'" in _signature("sysconfig.get_paths", sysconfig.get_paths)


def test_locality_figures_in_card():
    loc = json.loads((ASSET_DIR / "locality.json").read_text())["heldout_teacher_forced"]
    text = CARD.read_text()
    assert f"{100 * loc['share_overall']:.1f}%" in text
    assert f"{100 * loc['lru_hit_overall']:.1f}%" in text
    assert loc["share_overall"] > loc["random_share"] + 0.05
    assert loc["lru_hit_overall"] > loc["random_lru_hit"] + 0.05


def test_locality_stats_baselines():
    rng = random.Random(0)
    rand = [[[tuple(sorted(rng.sample(range(8), 2))) for _ in range(400)] for _ in range(2)] for _ in range(10)]
    s = locality_stats(rand, 8, cache_k=4)
    assert s["share_overall"] == pytest.approx(s["random_share"], abs=0.02)
    assert s["lru_hit_overall"] == pytest.approx(0.5, abs=0.02)
    sticky = [[[(0, 1)] * 50 + [(2, 3)] * 50] for _ in range(3)]
    s = locality_stats(sticky, 8, cache_k=4)
    assert s["share_per_layer"] == [round(98 / 99, 4)]
    # one cache per layer across sequences: 4 cold misses in the first sequence, then all hits
    assert s["lru_hit_overall"] == pytest.approx(1 - 4 / 600, abs=1e-4)


def test_answer_loss_counts_only_answer_tokens():
    enc = [([1, 5, 6, 7, 8, 2], 3)]
    ids, mask, labels = collate(enc, [0], pad_id=2)
    assert labels.tolist() == [[-100, -100, -100, 7, 8, 2]]
    logits = torch.zeros(1, 6, 16)
    loss, n = answer_loss(logits, labels)
    assert n == 3 and float(loss) == pytest.approx(3 * math.log(16))


def test_answers_a_follow_up_question(shipped):
    """A chat asks several questions in a row: the second answer is on topic too."""
    model, tok = shipped

    def answer(messages):
        prompt = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)["input_ids"]
        out = model.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=40, do_sample=False, pad_token_id=tok.eos_token_id)
        return tok.decode(out[0, len(prompt):], skip_special_tokens=True)

    chat = [{"role": "user", "content": "What does len do?"}]
    first = answer(chat)
    assert "number of items" in first
    chat += [{"role": "assistant", "content": first}, {"role": "user", "content": "What does sorted do?"}]
    assert "new list" in answer(chat)


def test_says_what_it_is_to_greetings_and_out_of_scope_questions(shipped, report):
    """Greetings and questions outside Python's documentation get the short trained answer (what the model is,
    what to ask), including question forms held out of training; their held-out loss is the reported one."""
    from tools.train_tiny.heldout import SCOPE_HELDOUT_FILE
    from tools.train_tiny.scope import build_scope_examples
    model, tok = shipped
    train_scope, held_scope = build_scope_examples()
    assert read_heldout(ASSET_DIR, SCOPE_HELDOUT_FILE) == held_scope
    assert not {e.question for e in train_scope} & {e.question for e in held_scope}
    enc, _ = heldout_encoded(ASSET_DIR, tok, name=SCOPE_HELDOUT_FILE)
    loss, n = heldout_loss(model, enc, tok.pad_token_id)
    assert n == report["scope"]["heldout_answer_tokens"]
    assert loss == pytest.approx(report["scope"]["heldout_loss"], abs=2e-3)

    def answer(question):
        prompt = tok.apply_chat_template([{"role": "user", "content": question}], tokenize=True,
                                         add_generation_prompt=True)["input_ids"]
        out = model.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=60, do_sample=False, pad_token_id=tok.eos_token_id)
        return tok.decode(out[0, len(prompt):], skip_special_tokens=True)

    trained = {e.question for e in train_scope}
    for q in ("Hello there", "Write a short poem about a GPU that is running out of memory.", "Tell me a joke.",
              "Good morning! What can you tell me?"):
        assert q not in trained
        text = answer(q)
        assert "demo model" in text and "Python" in text, (q, text)
    assert "number of items" in answer("What does the built-in function len do?")     # and it still knows Python


def test_builtins_survive_phrasings_held_out_of_training(shipped, report):
    """"What does the built-in function zip() do?" was answered with another docstring while "What does len do?"
    worked: zip is a class, and the data asked classes only as types. Builtins are never held out as subjects, so
    question forms are (tools/train_tiny/phrasing.py): their loss and greedy answers are the reported ones."""
    from tools.train_tiny.heldout import PHRASING_HELDOUT_FILE
    from tools.train_tiny.phrasing import HELD_FORMS, answered, build_phrasing_heldout
    model, tok = shipped
    held = read_heldout(ASSET_DIR, PHRASING_HELDOUT_FILE)
    hp = report["hyperparameters"]
    train, _ = build_examples(hp["seed"], hp["heldout_frac"])
    asked = {e.question for e in train}
    assert not asked & {e.question for e in held}                      # no held-out phrasing is trained
    assert "What does the built-in function zip() do?" in {e.question for e in held}
    assert "What does the built-in function zip do?" in asked          # classes are asked as functions too
    if sys.version.split()[0] == report["python"]:
        assert held == build_phrasing_heldout()
    assert len(held) == report["phrasing"]["heldout_turns"] == 3 * sum(1 for e in held if e.question.endswith(
        HELD_FORMS[0].split("{n}")[1]))
    enc, _ = heldout_encoded(ASSET_DIR, tok, name=PHRASING_HELDOUT_FILE)
    loss, n = heldout_loss(model, enc, tok.pad_token_id)
    assert n == report["phrasing"]["heldout_answer_tokens"]
    assert loss == pytest.approx(report["phrasing"]["heldout_loss"], abs=2e-3)
    wrong = answered(model, tok, held)
    assert wrong == report["phrasing"]["greedy_wrong"] and len(held) - len(wrong) == report["phrasing"]["greedy_right"]
    assert f"{len(held) - len(wrong)} of {len(held)}" in CARD.read_text()
    assert not any("zip" in q for q in wrong)


def test_the_app_answers_zip_as_it_runs_the_demo():
    """The question as a user asks it, through mixoff's runtime at the app's default quantization (the family's:
    4-bit attention, 2-bit experts) on the CPU."""
    from mixoff_app.config import EngineConfig, SamplingParams
    from mixoff_app.engine import Engine
    engine = Engine.load(EngineConfig(model=str(ASSET_DIR), device="cpu"))
    assert engine.quant.experts.bits == 2
    for q in ("What does the built-in function zip() do?", "What does the built-in function zip do?",
              "What does len do?"):
        text = "".join(ev.text for ev in engine.stream_chat([{"role": "user", "content": q}],
                                                             SamplingParams(max_new_tokens=16, greedy=True))
                       if ev.kind == "token")
        assert text.strip().startswith("zip(*iterables" if "zip" in q else "`len(obj, /)`"), (q, text)
