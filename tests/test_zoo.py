"""Tests of the embedded model family (transplant_core.zoo).

Tests that need the built models share one session fixture that calls
`zoo.build()` on zoo_root() ($TRANSPLANT_ZOO_DIR or the user cache): the first run
trains the family (~6 min on 2 cores), later runs reuse it.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from transplant_core import zoo  # noqa: E402
from transplant_core.zoo import builder, tasks  # noqa: E402
from transplant_core.zoo.lora import add_lora, is_lora_param, merge_lora  # noqa: E402
from transplant_core.zoo.tokenizer import ALPHABET, VOCAB_SIZE, build_tokenizer  # noqa: E402
from transplant_core.zoo.train import EOS_ID, PAD_ID, collate, encode, greedy, new_model, train  # noqa: E402

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 2, "max_position_embeddings": 64}
MIN_GAP = 0.40


# ------------------------------------------------------------ no build needed

def test_tokenizer_round_trip_via_autotokenizer(tmp_path):
    build_tokenizer().save_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    text = "add:12+7=19 rev:abc=cba UPPER, ok?"
    ids = tok(text)["input_ids"]
    assert ids == encode(text)
    assert len(ids) == len(text)  # one token per character, no BOS added
    assert tok.decode(ids) == text
    assert tok.padding_side == "left" and tok.pad_token_id == PAD_ID and tok.eos_token_id == EOS_ID
    assert len(tok) == VOCAB_SIZE
    batch = tok(["add:1+2=", "copy:abcdef="], padding=True)["input_ids"]
    assert batch[0][:4] == [PAD_ID] * 4  # left padded


def test_tasks_are_deterministic_and_pinned():
    first = {t: zoo.task_examples(t, "eval") for t in zoo.TASK_NAMES}
    tasks._held_out.cache_clear()
    tasks.held_out_prompts.cache_clear()
    again = {t: zoo.task_examples(t, "eval") for t in zoo.TASK_NAMES}
    assert first == again
    assert zoo.task_examples("rev", "train", 50) == zoo.task_examples("rev", "train", 50)
    # The data decide the weights: a change here must come with a RECIPE_REVISION bump.
    digest = hashlib.sha256(json.dumps([first, {t: zoo.task_examples(t, "train", 200) for t in zoo.TASK_NAMES},
                                        {t: zoo.task_examples(t, "probe") for t in zoo.TASK_NAMES}]).encode())
    assert digest.hexdigest()[:16] == PINNED_DATA_DIGEST, (
        "task data changed: bump builder.RECIPE_REVISION and update PINNED_DATA_DIGEST")


PINNED_DATA_DIGEST = "e22fa505a87bdc49"


def test_split_sizes_and_disjointness():
    for t in zoo.TASK_NAMES:
        ev, dev, test, probe = (zoo.task_examples(t, s) for s in ("eval", "dev", "test", "probe"))
        assert (len(ev), len(dev), len(test), len(probe)) == (300, 150, 150, 64)
        assert dev + test == ev
        held = [p for p, _ in ev + probe]
        assert len(set(held)) == len(held), f"{t}: repeated held-out prompt"
        train = {p for p, _ in zoo.task_examples(t, "train", 20000)}
        assert not train & set(held), f"{t}: training data contain held-out prompts"
        assert len(train) > 1000 and zoo.task_examples(t, "eval", 7) == ev[:7]


def test_answers_are_correct():
    letters = set("abcdefghijklmnopqrstuvwxyz")
    for split in ("eval", "probe", "train"):
        for t in zoo.TASK_NAMES:
            for p, a in zoo.task_examples(t, split, 300):
                name, body = p[:-1].split(":", 1)
                assert name == t and p.endswith("=")
                if t == "add":
                    x, y = body.split("+")
                    assert 0 <= int(x) <= 99 and 0 <= int(y) <= 99 and int(a) == int(x) + int(y)
                    assert a == str(int(a))
                    continue
                assert 3 <= len(body) <= 6 and set(body) <= letters
                expect = {"copy": body, "upper": body.upper(), "rev": body[::-1],
                          "sort": "".join(sorted(body))}[t]
                assert a == expect
                assert zoo.answer(p) == a
                assert set(p + a) <= set(ALPHABET)


def test_errors_name_the_fix(tmp_path):
    with pytest.raises(zoo.ZooError, match="valid tasks: copy"):
        zoo.task_examples("mul")
    with pytest.raises(zoo.ZooError, match="valid splits"):
        zoo.task_examples("add", "validation")
    with pytest.raises(zoo.ZooError, match="valid names: base, tuned, lora, v1, v2"):
        zoo.model_dir("v3", tmp_path)
    with pytest.raises(zoo.ZooError, match="transplant zoo build"):
        zoo.model_dir("v2", tmp_path)
    assert not zoo.is_built(tmp_path)


def test_workers_setting(monkeypatch):
    monkeypatch.setenv("TRANSPLANT_ZOO_WORKERS", "3")
    assert builder._workers() == 3
    for bad in ("0", "two", "-1"):
        monkeypatch.setenv("TRANSPLANT_ZOO_WORKERS", bad)
        with pytest.raises(zoo.ZooError, match="TRANSPLANT_ZOO_WORKERS"):
            builder._workers()
    # the longest chain starts first: trunk, then v1 (v1 -> v2) before base
    assert sorted(builder.RECIPE["stages"], key=builder._critical_path, reverse=True)[:3] == ["trunk", "v1", "base"]


def test_zoo_root_honours_env(monkeypatch, tmp_path):
    # the cache root, as the README says: the recipe folder inside it
    monkeypatch.setenv("TRANSPLANT_ZOO_DIR", str(tmp_path / "z"))
    assert zoo.zoo_root() == tmp_path / "z" / zoo.RECIPE_VERSION
    # a recipe folder itself (by its name, or because it holds models) is used as it is
    monkeypatch.setenv("TRANSPLANT_ZOO_DIR", str(tmp_path / "r9-0123456789"))
    assert zoo.zoo_root() == tmp_path / "r9-0123456789"
    (tmp_path / "mine" / "v2").mkdir(parents=True)
    (tmp_path / "mine" / "v2" / "card.json").write_text("{}")
    monkeypatch.setenv("TRANSPLANT_ZOO_DIR", str(tmp_path / "mine"))
    assert zoo.zoo_root() == tmp_path / "mine"
    monkeypatch.delenv("TRANSPLANT_ZOO_DIR")
    assert zoo.zoo_root().name == zoo.RECIPE_VERSION
    assert zoo.zoo_root().parent == zoo.zoo_root().home() / ".cache" / "transplant" / "zoo"


def test_each_stage_has_a_fixed_thread_count_in_its_recipe():
    """The bits depend on torch's thread count on some CPUs: the recipe fixes it per stage
    (so it is in the stage hash), and a build never hands a stage more threads mid-way."""
    for s, spec in builder.RECIPE["stages"].items():
        assert isinstance(spec["threads"], int) and spec["threads"] >= 1, s
    other = {**builder.RECIPE["stages"]["tuned"], "threads": 2}
    saved = builder.RECIPE["stages"]["tuned"]
    h = builder.stage_hash("tuned")
    try:
        builder.RECIPE["stages"]["tuned"] = other
        assert builder.stage_hash("tuned") != h
    finally:
        builder.RECIPE["stages"]["tuned"] = saved


def test_settings_are_well_formed():
    assert set(zoo.SETTINGS) == {"cross_generation", "base_vs_tuned", "adapter"}
    assert zoo.SETTINGS["cross_generation"] == {"target": "v2", "donor": "v1", "task": "add"}
    for s in zoo.SETTINGS.values():
        assert s["target"] in zoo.MODEL_NAMES and s["donor"] in zoo.MODEL_NAMES and s["task"] in zoo.TASK_NAMES
    assert zoo.SETTINGS["adapter"]["target"] == "base" and zoo.SETTINGS["adapter"]["donor"] == "lora"
    assert zoo.SETTINGS["base_vs_tuned"]["target"] == "base" and zoo.SETTINGS["base_vs_tuned"]["donor"] == "tuned"


def test_collate_puts_loss_on_answer_and_eos_only():
    ids, labels = collate([("add:1+2=", "3"), ("copy:abcdef=", "abcdef")])
    assert ids.shape == labels.shape == (2, len("copy:abcdef=abcdef") + 1)
    assert ids[0].tolist()[:10] == encode("add:1+2=3") + [EOS_ID]
    assert labels[0].tolist()[:10] == [-100] * 8 + encode("3") + [EOS_ID]
    assert set(labels[0].tolist()[10:]) == {-100} and set(ids[0].tolist()[10:]) == {PAD_ID}
    assert labels[1].tolist() == [-100] * 12 + encode("abcdef") + [EOS_ID]


def test_training_is_deterministic_and_respects_trainable():
    def run(trainable=None):
        m = new_model(TINY, 0)
        train(m, mixture={"copy": 1, "add": 1}, steps=4, lr=1e-2, seed=3, batch_size=8, warmup=1,
              trainable=trainable)
        return m.state_dict()

    a, b = run(), run()
    assert all(torch.equal(a[k], b[k]) for k in a)
    init = new_model(TINY, 0).state_dict()
    assert not torch.equal(a["model.embed_tokens.weight"], init["model.embed_tokens.weight"])
    lin = run(builder._trainable({"trainable": "linear"}))
    for k in init:
        moved = not torch.equal(lin[k], init[k])
        assert moved == any(s in k for s in builder._LINEAR), k


def test_weights_are_deterministic_at_a_fixed_thread_count():
    """What the build relies on: the same thread count gives the same bits. (Not that
    1 and 2 threads agree: on some CPUs they do not, hence a thread count per stage.)"""
    old = torch.get_num_threads()
    try:
        for n in (1, 2):
            runs = []
            torch.set_num_threads(n)
            for _ in range(2):
                m = new_model(builder.RECIPE["arch"], 0)
                train(m, mixture={"sort": 1, "add": 1}, steps=3, lr=3e-3, seed=1, batch_size=32, warmup=1)
                runs.append(m.state_dict())
            assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0]), n
    finally:
        torch.set_num_threads(old)


def test_lora_merge_matches_unmerged_and_is_plain():
    torch.manual_seed(0)
    m = new_model(TINY, 0)
    plain_keys = set(m.state_dict())
    ids = torch.tensor([encode("rev:abcd=dcba")])
    before = m(input_ids=ids).logits
    assert add_lora(m, rank=4, alpha=8.0) == 7 * TINY["num_hidden_layers"]
    assert torch.allclose(m(input_ids=ids).logits, before)  # B = 0 at start
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.endswith("lora_B"):
                p.normal_(0, 0.1)
    wrapped = m(input_ids=ids).logits
    assert not torch.allclose(wrapped, before, atol=1e-4)
    assert all(is_lora_param(n) == ("lora_" in n) for n, _ in m.named_parameters())
    assert merge_lora(m) == 7 * TINY["num_hidden_layers"]
    assert set(m.state_dict()) == plain_keys
    assert torch.allclose(m(input_ids=ids).logits, wrapped, atol=1e-5)


def test_greedy_batched_equals_one_by_one():
    m = new_model(TINY, 1)
    prompts = ["add:1+2=", "copy:abcdef=", "rev:xyz=", "upper:abcd="]
    assert greedy(m, prompts, max_new_tokens=6) == [greedy(m, [p], max_new_tokens=6)[0] for p in prompts]


def test_partial_dirs_do_not_count_as_built(tmp_path):
    d = tmp_path / "base"
    d.mkdir()
    (d / "config.json").write_text("{}")
    assert not zoo.is_built(tmp_path)
    with pytest.raises(zoo.ZooError):
        zoo.model_dir("base", tmp_path)


# ------------------------------------------------------------ the built family

@pytest.fixture(scope="session")
def zoo_built():
    summary = zoo.build(progress=True, log=print)  # cached after the first run
    assert zoo.is_built()
    return summary


def _acc(model, task, split="eval"):
    ex = zoo.task_examples(task, split)
    preds = greedy(model, [p for p, _ in ex])
    return sum(p == a for p, (_, a) in zip(preds, ex)) / len(ex)


@pytest.mark.parametrize("name", ["base", "tuned", "lora", "v1", "v2"])
def test_built_model_loads_and_card_matches(zoo_built, name):
    d = zoo.model_dir(name)
    for f in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json", "README.md",
              "card.json"):
        assert (d / f).is_file(), f
    model = AutoModelForCausalLM.from_pretrained(d).eval()
    tok = AutoTokenizer.from_pretrained(d)
    cfg = model.config
    assert type(model).__name__ == "LlamaForCausalLM"
    assert cfg.vocab_size == VOCAB_SIZE == len(tok)
    assert (cfg.pad_token_id, cfg.eos_token_id, cfg.bos_token_id) == (
        tok.pad_token_id, tok.eos_token_id, tok.bos_token_id)
    card = json.loads((d / "card.json").read_text())
    assert card["stage_hash"] == builder.stage_hash(name) and set(card["accuracy"]) == set(zoo.TASK_NAMES)
    readme = (d / "README.md").read_text()
    for t in zoo.TASK_NAMES:
        assert t in readme
    # re-evaluate two tasks in full: the card must agree exactly (deterministic greedy)
    with builder._threads(builder.stage_threads(name)):        # as the build evaluated it
        for t in (zoo.TASK_NAMES[0], "add", "rev"):
            assert _acc(model, t) == pytest.approx(card["accuracy"][t], abs=1e-4), (name, t)
    # HF's own generate() agrees with the zoo's evaluator on a few prompts
    prompts = [p for t in zoo.TASK_NAMES for p, _ in zoo.task_examples(t, "probe", 4)]
    enc = tok(prompts, return_tensors="pt", padding=True)
    out = model.generate(**enc, max_new_tokens=12, do_sample=False)
    hf = [t.split("</s>")[0] for t in tok.batch_decode(out[:, enc["input_ids"].shape[1]:])]
    assert hf == greedy(model, prompts)


@pytest.mark.parametrize("setting", ["cross_generation", "base_vs_tuned", "adapter"])
def test_setting_gap(zoo_built, setting):
    s = zoo.SETTINGS[setting]
    target = zoo.load_card(s["target"])["accuracy"][s["task"]]
    donor = zoo.load_card(s["donor"])["accuracy"][s["task"]]
    print(f"{setting}: donor {s['donor']} {donor:.3f} vs target {s['target']} {target:.3f} on {s['task']}")
    assert donor - target >= MIN_GAP, (setting, donor, target)
    assert zoo_built["settings"][setting]["gap"] == pytest.approx(donor - target, abs=1e-3)


def test_models_are_useful(zoo_built):
    """Every model is good at the tasks it was trained on last (no broken model)."""
    acc = zoo_built["accuracy"]
    for name in zoo.MODEL_NAMES:
        assert acc[name]["copy"] >= 0.95 and acc[name]["upper"] >= 0.95, (name, acc[name])
    for setting in zoo.SETTINGS.values():
        assert acc[setting["donor"]][setting["task"]] >= 0.85, setting


def test_v2_moved_only_linear_modules_and_lora_is_plain(zoo_built):
    from safetensors.torch import load_file

    sd = {n: load_file(zoo.model_dir(n) / "model.safetensors") for n in ("v1", "v2", "base", "lora")}
    assert set(sd["v1"]) == set(sd["v2"]) == set(sd["base"]) == set(sd["lora"])
    changed = {k for k in sd["v1"] if not torch.equal(sd["v1"][k], sd["v2"][k])}
    linear = {k for k in sd["v1"] if any(s in k for s in builder._LINEAR)}
    assert changed == linear  # every linear projection moved, nothing else
    lchanged = {k for k in sd["base"] if not torch.equal(sd["base"][k], sd["lora"][k])}
    assert lchanged == linear


def test_build_is_idempotent_and_rebuilds_exactly(zoo_built, tmp_path):
    again = zoo.build(progress=False, log=None)
    assert again["built"] == [] and again["accuracy"] == zoo_built["accuracy"]
    # a copy missing two models rebuilds just those, in two processes at once that end at
    # different times (lora's steps are slower; the one left used to get both threads
    # then, which changed its bits), bit for bit
    root = tmp_path / "zoo"
    shutil.copytree(zoo.zoo_root(), root, ignore=shutil.ignore_patterns("lora", "tuned", ".build.lock"))
    assert not zoo.is_built(root)
    lines = []
    summary = zoo.build(root, progress=False, log=lines.append)
    assert sorted(summary["built"]) == ["lora", "tuned"] and zoo.is_built(root)
    assert "2 at a time" in lines[0]
    for name in ("lora", "tuned"):
        a = (zoo.model_dir(name) / "model.safetensors").read_bytes()
        assert (root / name / "model.safetensors").read_bytes() == a, name
        assert zoo.load_card(name, root)["accuracy"] == zoo.load_card(name)["accuracy"]
        assert zoo.load_card(name, root)["threads"] == builder.RECIPE["stages"][name]["threads"]


def test_serial_build_in_process_matches(zoo_built, tmp_path, monkeypatch):
    """TRANSPLANT_ZOO_WORKERS=1 trains in this process, with the same result."""
    monkeypatch.setenv("TRANSPLANT_ZOO_WORKERS", "1")
    root = tmp_path / "zoo"
    shutil.copytree(zoo.zoo_root(), root, ignore=shutil.ignore_patterns("tuned", ".build.lock"))
    lines = []
    assert zoo.build(root, progress=False, log=lines.append)["built"] == ["tuned"]
    assert "1 at a time" in lines[0]
    a = (zoo.model_dir("tuned") / "model.safetensors").read_bytes()
    assert (root / "tuned" / "model.safetensors").read_bytes() == a


def test_a_seed_variant_is_the_fine_tune_trained_again_with_another_seed(zoo_built, tmp_path):
    """`transplant zoo variant STAGE --seed N`: the setting's fine-tune trained again from
    its parent with another data/torch seed (a few steps here), deterministic per seed."""
    from safetensors.torch import load_file

    a, b, c = (zoo.build_variant("v2", seed, out=tmp_path / name, progress=False, log=lambda *_: None, steps=6)
               for name, seed in (("a", 7), ("b", 7), ("c", 8)))
    wa, wb, wc = (load_file(str(d / "model.safetensors")) for d in (a, b, c))
    v1 = load_file(str(zoo.model_dir("v1") / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)                      # the same seed: the same bits
    assert any(not torch.equal(wa[k], wc[k]) for k in wa)                 # another seed: other weights
    moved = {k for k in wa if not torch.equal(wa[k], v1[k])}
    assert moved and all(k.endswith("proj.weight") for k in moved)       # v2's recipe: linear modules only
    card = json.loads((a / "card.json").read_text())
    assert card["variant_of"] == "v2" and card["variant_seed"] == 7 and card["variant_steps"] == 6
    assert card["lineage"][-1]["seed"] == 7 and card["lineage"][-1]["steps"] == 6
    assert zoo.build_variant("v2", 7, out=a, progress=False) == a         # reused
    with pytest.raises(zoo.ZooError, match="fine-tunes v2, tuned, lora"):
        zoo.build_variant("trunk", 1, out=tmp_path / "t")
    with pytest.raises(zoo.ZooError, match="not built"):
        zoo.build_variant("v2", 1, root=tmp_path / "empty")


def test_the_deep_lineage_is_the_cross_generation_recipe_on_a_deeper_model(zoo_built, tmp_path):
    from safetensors.torch import load_file

    out = zoo.build_deep(out=tmp_path / "deep", progress=False, log=lambda *_: None, steps=2)
    cfg = json.loads((out / "v2" / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 8 and cfg["hidden_size"] == builder.RECIPE["arch"]["hidden_size"]
    v1, v2 = (load_file(str(out / s / "model.safetensors")) for s in ("v1", "v2"))
    moved = {k for k in v1 if not torch.equal(v1[k], v2[k])}
    assert moved and all(k.endswith("proj.weight") for k in moved)       # v2: linear modules only, as in the zoo
    card = json.loads((out / "v2" / "card.json").read_text())
    assert card["name"] == "deep-v2" and card["arch"] == builder.DEEP_ARCH and card["variant_steps"] == 2
    assert [e["stage"] for e in card["lineage"]] == ["trunk", "v1", "v2"]
    before = (out / "v2" / "model.safetensors").stat().st_mtime_ns
    assert zoo.build_deep(out=out, progress=False, steps=2) == out             # reused
    assert (out / "v2" / "model.safetensors").stat().st_mtime_ns == before
    assert not builder._valid_dir(out / "v2")           # never mistaken for the zoo's own v2
