import os

import pytest

import surgery
from surgery.rules import ruleset
from surgery.rules.rule_file import load_rules, parse_rules
from surgery.rules.ruleset import RuleFileError, fullmatch_bounded, pattern_matches

# ------------------------------------------------------------------------------------ matching


def _decided(graph, rules_dict):
    plan = surgery.plan(graph, rules_dict, check=False)
    return {path: d for path, d in plan.decisions.items()}


def test_suffix_glob_matches_dot_aligned_suffixes(tiny_graphs):
    g = tiny_graphs["tiny-opt"]
    got = _decided(g, {"default": "freeze", "rules": [{"match": "q_proj", "action": "adapt"}]})
    assert sorted(p for p, d in got.items() if d.action == "adapt") == [
        "model.decoder.layers.0.self_attn.q_proj",
        "model.decoder.layers.1.self_attn.q_proj",
    ]
    got = _decided(g, {"default": "freeze", "rules": [{"match": "layers.1.self_attn.*", "action": "adapt"}]})
    assert sorted(p for p, d in got.items() if d.action == "adapt") == [
        f"model.decoder.layers.1.self_attn.{n}" for n in ("k_proj", "out_proj", "q_proj", "v_proj")
    ]
    assert not pattern_matches("proj", "model.decoder.layers.0.self_attn.q_proj")  # whole components only
    assert pattern_matches("layers.[0-1].fc?", "model.decoder.layers.0.fc2")
    assert pattern_matches("model.decoder.layers.*.fc1", "model.decoder.layers.1.fc1")


def test_regex_is_a_full_match_on_the_full_path(tiny_graphs):
    g = tiny_graphs["tiny-llama"]
    got = _decided(
        g, {"default": "freeze", "rules": [{"match": r"re:model\.layers\.1\.mlp\.(up|down)_proj", "action": "adapt"}]}
    )
    assert sorted(p for p, d in got.items() if d.action == "adapt") == [
        "model.layers.1.mlp.down_proj",
        "model.layers.1.mlp.up_proj",
    ]
    assert not pattern_matches("re:mlp", "model.layers.1.mlp.up_proj")


@pytest.mark.parametrize(
    "pattern",
    [r"(q|v)_proj\.\1", r"(?P<p>q)_(?P=p)", r"(q)_proj\g<1>", r"(q(?R)?)", r"(q)(?1)", r"(?P<p>q)(?&p)", r"(q)(?-1)"],
)
def test_backreferences_and_recursion_are_refused_when_the_rule_file_is_read(write_rules, pattern):
    path = write_rules(f"rules:\n  - match: q_proj\n    action: adapt\n  - match: 're:{pattern}'\n    action: freeze\n")
    with pytest.raises(RuleFileError, match="refers back to a group.*catastrophic backtracking") as err:
        load_rules(path)
    assert str(err.value).startswith(f"{path}:4: rule 2: "), err.value
    by_module = write_rules(
        f"rules:\n  - match: q_proj\n    action: adapt\n    lora_by_module:\n      're:{pattern}': {{r: 4}}\n"
    )
    with pytest.raises(RuleFileError, match=f"{by_module}:4: rule 1: .*catastrophic backtracking"):
        load_rules(by_module)


@pytest.mark.parametrize(
    "pattern,path,matches",
    [
        (r".*\.[\1]_proj", "model.layers.0.self_attn.\x01_proj", True),  # in a class, \1 is a character
        (r".*\\1", "a\\1", True),  # an escaped backslash, then the digit
        (r"(?:q|k)_proj", "q_proj", True),
        (r"(?P<kind>q|k)_proj", "k_proj", True),  # a named group is no backreference
        (r"\101_proj", "A_proj", True),  # three octal digits are one character
    ],
)
def test_what_only_looks_like_a_backreference_is_read_and_matched(pattern, path, matches):
    assert pattern_matches(f"re:{pattern}", path) is matches


def test_a_pattern_is_refused_by_its_own_work_not_by_the_machine_s_clock(write_rules, tiny_graphs, monkeypatch):
    """A catastrophic pattern without a backreference passes the reading and is caught while it matches."""
    path = write_rules("rules:\n  - match: 're:(.*?)+_'\n    action: adapt\n")
    load_rules(path)  # nothing to see statically
    monkeypatch.setattr(ruleset, "REGEX_TIMEOUT", 0.2)  # CPU seconds of the matching thread; the default is 2
    with pytest.raises(RuleFileError, match=f"{path}:2: pattern .* took over 0.2 s .*catastrophic backtracking"):
        surgery.plan(tiny_graphs["tiny-opt"], path)


def test_a_busy_process_delays_a_benign_pattern_but_never_refuses_it(monkeypatch):
    """regex's timeout counts the whole process's CPU time (other threads' too): when it fires while the match
    itself has spent next to nothing, the match runs again with more room instead of being refused."""
    limits = []

    class Busy:  # fullmatch as regex answers it while other threads of the process spend the CPU time
        def fullmatch(self, path, timeout):
            limits.append(timeout)
            if len(limits) < 4:
                raise TimeoutError("regex timed out")
            return path

    monkeypatch.setattr(ruleset, "compile_regex", lambda text: Busy())
    assert fullmatch_bounded("re:.*q_proj", "model.layers.0.self_attn.q_proj", budget=0.5)
    assert limits == [0.5, 1.0, 2.0, 4.0]


def test_type_narrows_by_op_kind(tiny_graphs):
    g = tiny_graphs["tiny-gpt2"]
    got = _decided(g, {"default": "freeze", "rules": [{"match": "*", "type": "conv1d", "action": "adapt"}]})
    adapted = {p for p, d in got.items() if d.action == "adapt"}
    assert adapted == {
        f"transformer.h.{i}.{n}" for i in (0, 1) for n in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    }


def test_first_matching_rule_wins_and_is_named(tiny_graphs):
    g = tiny_graphs["tiny-opt"]
    plan = surgery.plan(
        g,
        {
            "default": "freeze",
            "quantize": "int8",
            "rules": [
                {"match": "layers.0.fc1", "action": "plain"},
                {"match": "fc1", "action": "adapt", "lora": {"r": 2}},
            ],
        },
        check=False,
    )
    assert plan.decisions["model.decoder.layers.0.fc1"].action == "plain"
    assert plan.decisions["model.decoder.layers.0.fc1"].rule.index == 1
    assert plan.decisions["model.decoder.layers.1.fc1"].action == "adapt"
    assert plan.decisions["model.decoder.layers.1.fc1"].lora.r == 2
    assert plan.decisions["model.decoder.final_layer_norm"].rule is None  # the default


def test_rules_keep_file_and_line(write_rules):
    path = write_rules(
        "version: 1\nquantize: nf4\nrules:\n  - match: q_proj\n    action: adapt\n"
        "  - match: lm_head\n    action: plain\n"
    )
    rules = load_rules(path)
    assert [r.line for r in rules.rules] == [4, 6]
    assert rules.rules[1].location == f"{path}:6"
    assert rules.quantize.scheme == "nf4" and rules.default == "quantize"


@pytest.mark.parametrize("name", ["qv_lora", "all_linear_lora", "qlora_nf4", "finetuna_default", "full_finetune"])
def test_bundled_rule_files_load_by_name(name):
    rules = load_rules(name)
    assert rules.source == f"rules/{name}.yaml" and rules.description
    assert parse_rules(rules.to_dict()).to_json() == rules.to_json()  # canonical round trip


# ------------------------------------------------------------------------------ bad rule files

BAD = [
    ("malformed YAML", "rules:\n  - match: [q_proj\n", 3, "flow sequence at line 2"),
    ("top level a list", "- match: q_proj\n", None, "top level must be a mapping"),
    ("rules not a list", "rules: q_proj\n", 1, "must be a list"),
    ("rule not a mapping", "rules:\n  - q_proj\n", None, "rule 1: must be a mapping"),
    ("missing match", "rules:\n  - action: adapt\n", 2, "needs `match:`"),
    ("wrong type for match", "rules:\n  - match: 3\n    action: adapt\n", 2, "needs `match:`"),
    ("unknown action", "rules:\n  - match: q_proj\n    action: adpat\n", 3, "did you mean 'adapt'"),
    ("unknown key", "rules:\n  - match: q_proj\n    action: adapt\n    lora_r: 8\n", 4, "unknown key 'lora_r'"),
    ("unknown top key", "version: 1\nrulez: []\n", 2, "did you mean 'rules'"),
    ("unknown type", "rules:\n  - match: q\n    type: dense\n    action: adapt\n", 3, "unknown type 'dense'"),
    (
        "lora on freeze",
        "rules:\n  - match: q_proj\n    action: freeze\n    lora: {r: 4}\n",
        4,
        "only allowed on an adapt rule",
    ),
    (
        "r below 1",
        "rules:\n  - match: q_proj\n    action: adapt\n    lora:\n      r: 0\n",
        5,
        "r must be an integer from 1 to",
    ),
    ("r not an int", "rules:\n  - match: q_proj\n    action: adapt\n    lora: {r: 2.5}\n", 4, "r must be an integer"),
    ("dropout 1", "rules:\n  - match: q_proj\n    action: adapt\n    lora:\n      dropout: 1.0\n", 5, "[0, 1)"),
    ("dropout negative", "rules:\n  - match: q\n    action: adapt\n    lora: {dropout: -0.1}\n", 4, "[0, 1)"),
    ("unknown lora option", "rules:\n  - match: q\n    action: adapt\n    lora: {rank: 4}\n", 4, "unknown LoRA option"),
    ("duplicate key", "rules:\n  - match: q_proj\n    action: adapt\n    action: plain\n", 4, "duplicate key 'action'"),
    ("duplicate top key", "version: 1\nversion: 1\n", 2, "duplicate key"),
    ("bad scheme", "quantize: int4\n", 1, "unknown quantization scheme"),
    ("bad quant option", "quantize: {scheme: int8, double_quant: true}\n", 1, "unknown int8 option"),
    ("bad blocksize", "quantize: {scheme: nf4, blocksize: 100}\n", 1, "blocksize"),
    ("newer version", "version: 2\nrules: []\n", 1, "newer"),
    ("default adapt", "default: adapt\n", 1, "default cannot be 'adapt'"),
    ("bad regex", "rules:\n  - match: 're:(q'\n    action: adapt\n", 2, "bad regex"),
    ("backreference", "rules:\n  - match: 're:(q|v)_proj\\.\\1'\n    action: adapt\n", 2, "catastrophic backtracking"),
    ("untie on adapt", "rules:\n  - match: q\n    action: adapt\n    untie: true\n", 4, "only allowed on a plain"),
    ("empty", "", None, "is empty"),
    ("whitespace only", "  \n\n", None, "is empty"),
]


@pytest.mark.parametrize("case,text,line,needle", BAD, ids=[b[0] for b in BAD])
def test_bad_rule_files_name_file_and_line(write_rules, case, text, line, needle):
    path = write_rules(text)
    with pytest.raises(RuleFileError) as err:
        load_rules(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}:{line}:" if line else str(path)), msg
    assert needle in msg, msg


def test_directory_binary_huge_and_missing_files(tmp_path):
    with pytest.raises(RuleFileError, match="is a directory"):
        load_rules(tmp_path)
    garbage = tmp_path / "garbage.yaml"
    garbage.write_bytes(os.urandom(512) + b"\x00")
    with pytest.raises(RuleFileError, match="binary"):
        load_rules(garbage)
    latin = tmp_path / "latin.yaml"
    latin.write_bytes(b"rules: [\xe9]\n")
    with pytest.raises(RuleFileError, match="not UTF-8"):
        load_rules(latin)
    huge = tmp_path / "huge.yaml"
    huge.write_text("rules:\n" + "  - {match: q_proj, action: adapt}\n" * 40000)
    with pytest.raises(RuleFileError, match="at most"):
        load_rules(huge)
    with pytest.raises(RuleFileError, match="did you mean 'qv_lora'"):
        load_rules("qv_lroa")


def test_the_rule_file_docs_show_the_bundled_qv_lora_file_as_shipped():
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    readme = (root / "docs" / "rule-files.md").read_text()
    start = readme.index("```yaml\n", readme.index("The bundled `rules/qv_lora.yaml`, as shipped")) + len("```yaml\n")
    assert readme[start : readme.index("```", start)] == (root / "rules" / "qv_lora.yaml").read_text()


def test_use_rslora_is_peft_s_name_and_the_old_spelling_still_reads():
    def lora(**options):
        return (
            parse_rules(
                {
                    "version": 1,
                    "rules": [{"match": "q_proj", "action": "adapt", "lora": {"r": 16, "alpha": 8, **options}}],
                }
            )
            .rules[0]
            .lora
        )

    assert lora(use_rslora=True).scaling == 8 / 4 and lora().scaling == 8 / 16  # alpha / sqrt(r) vs alpha / r
    assert lora(rslora=True) == lora(use_rslora=True)  # adapter files written before the rename load alike
    assert "use_rslora" in lora(use_rslora=True).to_dict()
    with pytest.raises(RuleFileError, match="give `use_rslora` only"):
        lora(use_rslora=True, rslora=True)
    with pytest.raises(RuleFileError, match="lora use_rslora must be true or false"):
        lora(use_rslora="yes")


def test_init_lora_weights_is_peft_s_name_and_base_rewriting_inits_are_refused_with_the_reason(write_rules):
    def lora(**options):
        return (
            parse_rules({"version": 1, "rules": [{"match": "q_proj", "action": "adapt", "lora": {"r": 4, **options}}]})
            .rules[0]
            .lora
        )

    assert lora(init_lora_weights="gaussian") == lora(init="gaussian") != lora()
    assert lora(init_lora_weights=True) == lora(init="kaiming") == lora()
    assert lora(use_dora=False) == lora()
    assert lora(init_lora_weights="loftq") == lora(init="loftq") != lora()
    for init in ("pissa", "pissa_niter_4", "olora", "corda"):
        with pytest.raises(
            RuleFileError,
            match=rf"init_lora_weights '{init}' is not supported.*shared by every "
            "fine-tune and stays untouched",
        ):
            lora(init_lora_weights=init)
    with pytest.raises(RuleFileError, match=r"unknown init_lora_weights 'gausian'; did you mean 'gaussian'"):
        lora(init_lora_weights="gausian")
    with pytest.raises(RuleFileError, match="not both"):
        lora(init="gaussian", init_lora_weights="gaussian")
    with pytest.raises(RuleFileError, match="use_dora with loftq: DoRA.s magnitude is the norm"):
        lora(init_lora_weights="loftq", use_dora=True)
    path = write_rules(
        "version: 1\nrules:\n  - match: q_proj\n    action: adapt\n    lora: {r: 4, init_lora_weights: "
        "loftq, loftq_config: {loftq_bits: 4, loftq_iter: 5}}\n"
    )
    with pytest.raises(
        RuleFileError,
        match=r"rules.yaml:5: rule 1: loftq_config is not needed.*one pass \(PEFT's "
        "loftq_iter: 1",
    ):
        load_rules(path)


def test_lora_config_takes_pefts_names_and_rule_files_read_both_spellings():
    from surgery.rules.ruleset import LoraConfig, LoraValueError

    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, init_lora_weights="gaussian", use_rslora=True)
    assert config.scaling == 8 / 2 and config.to_dict()["alpha"] == 8 and config.to_dict()["init"] == "gaussian"
    with pytest.raises(TypeError):
        LoraConfig(4, 8)  # keyword-only
    with pytest.raises(LoraValueError, match="lora r must be an integer"):
        LoraConfig(r=0)
    with pytest.raises(LoraValueError, match="use_dora with bias"):
        LoraConfig(use_dora=True, bias=True)
    peft_names = parse_rules(
        {
            "rules": [
                {
                    "match": "q",
                    "action": "adapt",
                    "lora": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.1, "init_lora_weights": "gaussian"},
                }
            ]
        }
    )
    short_names = parse_rules(
        {"rules": [{"match": "q", "action": "adapt", "lora": {"r": 4, "alpha": 8, "dropout": 0.1, "init": "gaussian"}}]}
    )
    assert (
        peft_names.rules[0].lora
        == short_names.rules[0].lora
        == LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, init_lora_weights="gaussian")
    )
    assert peft_names.to_json() == short_names.to_json()  # one canonical form in adapter files
    with pytest.raises(RuleFileError, match="give `lora_alpha` only"):
        parse_rules({"rules": [{"match": "q", "action": "adapt", "lora": {"alpha": 8, "lora_alpha": 8}}]})
