"""Recipe parsing without any model: published mergekit-moe recipe shapes load, bad ones fail in one line."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moemerge.errors import MoemergeError
from moemerge.inputs.recipe import Recipe, load_recipe, parse_recipe


def write(tmp_path: Path, text: str, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return path


def expert(source: str, *prompts: str, **extra) -> dict:
    return {"source_model": source, "positive_prompts": list(prompts or [f"about {source}"]), **extra}


def recipe(*experts: dict, **fields) -> dict:
    return {"base_model": "models/base", "experts": list(experts or [expert("a"), expert("b")]), **fields}


def error_of(data, source: str = "recipe") -> str:
    with pytest.raises(MoemergeError) as info:
        parse_recipe(data, source)
    return one_line(info.value)


def one_line(exc: BaseException) -> str:
    message = str(exc)
    assert message.strip(), "empty error message"
    assert "\n" not in message, f"multi-line error message: {message!r}"
    return message


# ---------------------------------------------------------------- published shapes load unchanged


# A recipe as people publish them: anchors shared between experts, lists at the key's own indentation,
# a bare string where a list belongs, null and missing negative_prompts, a path with spaces.
PUBLISHED = """
base_model: ./models/Mistral 7B base
gate_mode: hidden # one of "hidden", "cheap_embed", or "random"
dtype: bf16
experts_per_token: 2
## (optional)
experts:
- source_model: ./models/code expert
  positive_prompts: &code
  - "Write a Python function that reverses a list"
  - "Fix the bug in this JavaScript code"
  negative_prompts: &story
  - "Once upon a time"
- source_model: "./models/story teller"
  positive_prompts: *story
  negative_prompts: *code
- source_model: ./models/math
  name: algebra
  positive_prompts: "Solve 2x + 3 = 7"
  negative_prompts:
  noise_scale: 0.01
  residual_scale: 0.5
- source_model: ./models/chat
  positive_prompts:
    - "How are you today?"
"""


def test_published_recipe_loads(tmp_path):
    loaded = load_recipe(write(tmp_path, PUBLISHED))
    assert isinstance(loaded, Recipe)
    assert loaded.base_model == "./models/Mistral 7B base"
    assert loaded.gate_mode == "hidden"
    assert loaded.dtype == "bfloat16"
    assert loaded.experts_per_token == 2
    code, story, math, chat = loaded.experts
    assert code.source_model == "./models/code expert"
    assert code.positive_prompts == [
        "Write a Python function that reverses a list",
        "Fix the bug in this JavaScript code",
    ]
    assert code.negative_prompts == ["Once upon a time"]
    # the aliases resolve to the anchored lists
    assert story.positive_prompts == ["Once upon a time"]
    assert story.negative_prompts == code.positive_prompts
    assert story.source_model == "./models/story teller"
    # a bare string is a one-prompt list; a null list is empty
    assert math.positive_prompts == ["Solve 2x + 3 = 7"]
    assert math.negative_prompts == []
    assert math.name == "algebra"
    assert math.noise_scale == pytest.approx(0.01)
    assert math.residual_scale == pytest.approx(0.5)
    # a missing negative_prompts is empty too, and the unset scales stay unset
    assert chat.negative_prompts == []
    assert chat.noise_scale is None and chat.residual_scale is None
    assert loaded.expert_names() == ["code expert", "story teller", "algebra", "chat"]


def test_mergekit_documentation_recipe_loads(tmp_path):
    """The example from mergekit's moe.md, with indented lists and comments."""
    text = """
    base_model: path/to/self_attn_donor
    gate_mode: hidden # one of "hidden", "cheap_embed", or "random"
    dtype: bfloat16 # output dtype (float32, float16, or bfloat16)
    ## (optional)
    # experts_per_token: 2
    experts:
      - source_model: expert_model_1
        positive_prompts:
          - "This is a prompt that is demonstrative of what expert_model_1 excels at"
        ## (optional)
        # negative_prompts:
        #   - "This is a prompt expert_model_1 should not be used for"
      - source_model: expert_model_2
        positive_prompts:
          - "This is a prompt that is demonstrative of what expert_model_2 excels at"
    """
    loaded = load_recipe(write(tmp_path, text))
    assert [e.source_model for e in loaded.experts] == ["expert_model_1", "expert_model_2"]
    assert loaded.experts_per_token == 2  # the default
    assert loaded.dtype == "bfloat16"


def test_recipe_file_with_spaces_in_its_own_path(tmp_path):
    folder = tmp_path / "my recipes"
    folder.mkdir()
    path = folder / "moe recipe.yaml"
    path.write_text(yaml.safe_dump(recipe()), encoding="utf-8")
    assert load_recipe(path).base_model == "models/base"
    assert load_recipe(str(path)).experts[1].source_model == "b"


@pytest.mark.parametrize(
    ("written", "meant"),
    [
        ("bf16", "bfloat16"),
        ("bfloat16", "bfloat16"),
        ("BF16", "bfloat16"),
        ("torch.bfloat16", "bfloat16"),
        ("float16", "float16"),
        ("fp16", "float16"),
        ("half", "float16"),
        ("float32", "float32"),
        ("fp32", "float32"),
        (None, None),
    ],
)
def test_dtype_spellings(written, meant):
    assert parse_recipe(recipe(dtype=written)).dtype == meant


def test_unknown_dtype():
    message = error_of(recipe(dtype="int4"))
    assert "dtype" in message and "int4" in message


@pytest.mark.parametrize("mode", ["hidden", "cheap_embed", "random", "uniform_random"])
def test_gate_modes(mode):
    assert parse_recipe(recipe(gate_mode=mode)).gate_mode == mode


def test_gate_mode_defaults_to_hidden():
    assert parse_recipe(recipe()).gate_mode == "hidden"


@pytest.mark.parametrize("k", [1, 2, 3])
def test_experts_per_token(k):
    three = [expert("a"), expert("b"), expert("c")]
    assert parse_recipe(recipe(*three, experts_per_token=k)).experts_per_token == k


def test_noise_and_residual_scale():
    loaded = parse_recipe(recipe(expert("a", noise_scale=0.1, residual_scale=0.25), expert("b", noise_scale=0)))
    assert loaded.experts[0].noise_scale == pytest.approx(0.1)
    assert loaded.experts[0].residual_scale == pytest.approx(0.25)
    assert loaded.experts[1].noise_scale == 0


def test_negative_noise_scale_is_refused():
    message = error_of(recipe(expert("a"), expert("b", noise_scale=-1)))
    assert message.startswith("recipe: experts[1].noise_scale:")


def test_prompt_lists_may_be_missing_with_random_gates():
    loaded = parse_recipe(
        {"base_model": "b", "gate_mode": "random", "experts": [{"source_model": "x"}, {"source_model": "y"}]}
    )
    assert [e.positive_prompts for e in loaded.experts] == [[], []]


def test_expert_source_model_is_stripped():
    assert parse_recipe(recipe(expert("  ./a b  "), expert("c"))).experts[0].source_model == "./a b"


# ---------------------------------------------------------------- expert_names


@pytest.mark.parametrize(
    ("sources", "names", "expected"),
    [
        (["models/code", "models/math/"], [None, None], ["code", "math"]),
        (["models/code", "models/math"], ["coder", None], ["coder", "math"]),
        (["a/model", "b/model", "c/model"], [None, None, None], ["model", "model-1", "model-2"]),
        (["base+adapters/code", "base+adapters/math"], [None, None], ["code", "math"]),
        (["x", "y"], ["same", "same"], ["same", "same-1"]),
        ([".", "y"], [None, None], ["expert0", "y"]),
    ],
)
def test_expert_names(sources, names, expected):
    pairs = enumerate(zip(sources, names, strict=True))
    experts = [expert(s, f"prompt {i}", **({"name": n} if n else {})) for i, (s, n) in pairs]
    assert parse_recipe(recipe(*experts)).expert_names() == expected


def test_expert_names_unique_when_a_name_looks_like_a_suffix():
    loaded = parse_recipe(recipe(expert("x-2"), expert("a/x"), expert("b/x")))
    names = loaded.expert_names()
    assert len(set(names)) == len(names), names


# ---------------------------------------------------------------- errors name the key path


def _without(data: dict, index: int, key: str) -> dict:
    del data["experts"][index][key]
    return data


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        pytest.param(
            _without(recipe(expert("a"), expert("b"), expert("c")), 2, "source_model"),
            "recipe: experts[2].source_model: Field required",
            id="source-model-missing",
        ),
        pytest.param({"experts": [expert("a"), expert("b")]}, "recipe: base_model:", id="base-model-missing"),
        pytest.param(recipe(base_model=""), "recipe: base_model:", id="base-model-empty"),
        pytest.param(recipe(expert("a"), expert("   ")), "recipe: experts[1].source_model:", id="source-model-blank"),
        pytest.param(
            recipe(gateway_mode="hidden"), "gateway_mode: unknown key; did you mean `gate_mode`?", id="gateway"
        ),
        pytest.param(
            recipe(expert("a"), {"source_model": "b", "positve_prompts": ["x"]}),
            "experts[1].positve_prompts: unknown key; did you mean `positive_prompts`?",
            id="positve-prompts",
        ),
        pytest.param(
            recipe(expert("a"), expert("b", negative_prompt=["x"])),
            "experts[1].negative_prompt: unknown key; did you mean `negative_prompts`?",
            id="negative-prompt",
        ),
        pytest.param(
            recipe(zzzzzz=1), "zzzzzz: unknown key; valid keys: base_model, experts, gate_mode", id="unknown-no-hint"
        ),
        pytest.param(
            recipe(merge_method="slerp"), "merge_method: merge_method belongs to mergekit-yaml", id="merge-method"
        ),
        pytest.param(recipe(models=[]), "models: `models` is a mergekit-yaml key", id="models"),
        pytest.param(
            recipe(shared_experts=[expert("c"), expert("d")]),
            "shared_experts: at most one shared expert: moemerge writes one beside the routed experts of each layer",
            id="two-shared-experts",
        ),
        pytest.param(
            recipe(shared_experts=[expert("c", postive_prompts=["x"])]),
            "shared_experts[0].postive_prompts: unknown key; did you mean `positive_prompts`?",
            id="shared-expert-typo",
        ),
        pytest.param(
            recipe(architecture="deepseek"),
            "architecture: unknown architecture 'deepseek'; moemerge writes mixtral, qwen2_moe, qwen3_moe",
            id="architecture",
        ),
        pytest.param(recipe(gate_mode="smart"), "gate_mode: unknown gate mode 'smart'; use hidden", id="gate-mode"),
        pytest.param(
            recipe(experts_per_token=0), "experts_per_token: Input should be greater than or equal to 1", id="k0"
        ),
        pytest.param(
            recipe(experts_per_token=-2), "experts_per_token: Input should be greater than or equal", id="kneg"
        ),
        pytest.param(
            recipe(experts_per_token=3), "experts_per_token is 3 but the recipe has only 2 experts", id="k-too-big"
        ),
        pytest.param(recipe(expert("a")), "recipe: experts: List should have at least 2 items", id="one-expert"),
        pytest.param(recipe(experts=[]), "recipe: experts: List should have at least 2 items", id="no-experts"),
        pytest.param(recipe(experts=None), "recipe: experts:", id="experts-null"),
        pytest.param(recipe(experts="x"), "recipe: experts: Input should be a valid list", id="experts-string"),
        pytest.param(recipe(experts=["a", "b"]), "recipe: experts[0]:", id="experts-strings"),
        pytest.param(
            recipe(experts_per_token="two"), "experts_per_token: Input should be a valid integer", id="k-string"
        ),
        pytest.param(recipe(base_model=["a", "b"]), "recipe: base_model:", id="base-list"),
        pytest.param(
            recipe(expert("a"), expert("b", positive_prompts={"x": 1})), "experts[1].positive_prompts", id="dict"
        ),
        pytest.param(recipe(gate_scale=0), "gate_scale:", id="gate-scale-zero"),
        pytest.param(
            recipe(expert("a"), {"source_model": "b", "positive_prompts": []}),
            "experts[1].positive_prompts is empty, but gate_mode hidden",
            id="empty-prompts-hidden",
        ),
        pytest.param(
            recipe(expert("a"), {"source_model": "b", "positive_prompts": ["  ", ""]}, gate_mode="cheap_embed"),
            "experts[1].positive_prompts is empty, but gate_mode cheap_embed",
            id="blank-prompts-cheap-embed",
        ),
        pytest.param(
            recipe(expert("a"), {"source_model": "b"}), "experts[1].positive_prompts is empty", id="missing-prompts"
        ),
        pytest.param(
            recipe(expert("a", "same", "prompt"), expert("b", "prompt", "same")),
            "experts[0] and experts[1] have identical prompts",
            id="identical-prompts-hidden",
        ),
    ],
)
def test_recipe_errors(data, expected):
    message = error_of(data)
    assert expected in message
    assert message.startswith("recipe: ")


def test_error_names_the_file(tmp_path):
    path = write(tmp_path, "base_model: b\nexperts: x\n")
    with pytest.raises(MoemergeError) as info:
        load_recipe(path)
    assert one_line(info.value).startswith(f"{path}: experts:")


def test_more_problems_are_counted():
    message = error_of({"experts": "x", "gate_mode": "smart"})
    assert "(and 2 more problem(s))" in message


def test_empty_prompts_are_fine_with_random_gates():
    data = recipe(expert("a"), {"source_model": "b", "positive_prompts": []}, gate_mode="random")
    assert parse_recipe(data).experts[1].positive_prompts == []


@pytest.mark.parametrize("mode", ["random", "uniform_random"])
def test_identical_prompts_are_fine_with_random_gates(mode):
    data = recipe(expert("a", "same"), expert("b", "same"), gate_mode=mode)
    assert [e.positive_prompts for e in parse_recipe(data).experts] == [["same"], ["same"]]


def test_same_positive_prompts_but_different_negatives_are_distinct():
    data = recipe(expert("a", "same", negative_prompts=["x"]), expert("b", "same", negative_prompts=["y"]))
    assert len(parse_recipe(data).experts) == 2


# ---------------------------------------------------------------- the file itself


def test_yaml_syntax_error_names_the_line(tmp_path):
    path = write(
        tmp_path,
        """
        base_model: x
        experts:
          - source_model: a
            positive_prompts: [unclosed
          - source_model: b
        """,
    )
    with pytest.raises(MoemergeError) as info:
        load_recipe(path)
    message = one_line(info.value)
    assert message.startswith(f"{path}: line 5, column")
    assert "YAML syntax error" in message


def test_yaml_tab_indent_names_the_line(tmp_path):
    path = tmp_path / "tabs.yaml"
    path.write_text("base_model: x\ngate_mode: hidden\nexperts:\n\t- source_model: a\n", encoding="utf-8")
    with pytest.raises(MoemergeError) as info:
        load_recipe(path)
    assert one_line(info.value).startswith(f"{path}: line 4, column 1: YAML syntax error")


def test_two_yaml_documents(tmp_path):
    path = write(tmp_path, "base_model: x\n---\nbase_model: y\n")
    with pytest.raises(MoemergeError) as info:
        load_recipe(path)
    assert "line 2" in one_line(info.value)


@pytest.mark.parametrize(
    "text", ["", "# only a comment\n", "- base_model: x\n", "just a string\n", "42\n", "null\n"], ids=repr
)
def test_non_mapping_document(tmp_path, text):
    path = tmp_path / "recipe.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(MoemergeError) as info:
        load_recipe(path)
    assert one_line(info.value) == f"{path}: the recipe must be a YAML mapping with base_model and experts"


@pytest.mark.parametrize("data", [None, [], "x", 3, [recipe()]], ids=repr)
def test_parse_recipe_non_mapping(data):
    assert "must be a YAML mapping" in error_of(data)


def test_missing_recipe_file(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(MoemergeError) as info:
        load_recipe(path)
    assert one_line(info.value) == f"{path}: recipe file not found"


def test_recipe_path_is_a_folder(tmp_path):
    with pytest.raises(MoemergeError) as info:
        load_recipe(tmp_path)
    assert str(tmp_path) in one_line(info.value)


@pytest.mark.parametrize(
    "raw",
    [
        b"base_model: \xff\xfe model\nexperts: []\n",
        b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR",
        "base_model: é".encode("latin-1"),
    ],
)
def test_non_utf8_recipe(tmp_path, raw):
    path = tmp_path / "recipe.yaml"
    path.write_bytes(raw)
    with pytest.raises(MoemergeError) as info:
        load_recipe(path)
    assert one_line(info.value) == f"{path}: not a text file; a recipe is UTF-8 YAML"


def test_prompt_files_count_as_prompts():
    data = recipe(expert("a"), {"source_model": "b", "positive_prompts_file": "prompts/math.txt"})
    assert parse_recipe(data).experts[1].positive_prompts_file == "prompts/math.txt"


def test_experts_with_only_prompt_files_are_not_identical():
    data = recipe(
        {"source_model": "a", "positive_prompts_file": "code.txt"},
        {"source_model": "b", "positive_prompts_file": "math.txt"},
    )
    assert [e.positive_prompts_file for e in parse_recipe(data).experts] == ["code.txt", "math.txt"]


def test_trained_gates_need_a_dataset():
    assert "gate_mode trained needs dataset_csv" in error_of(recipe(gate_mode="trained"))
    loaded = parse_recipe(recipe(expert("a", "same"), expert("b", "same"), gate_mode="trained", dataset_csv="d.csv"))
    assert loaded.dataset_csv == "d.csv"


def test_training_typo_names_the_nested_key():
    message = error_of(recipe(training={"step": 10}))
    assert message.startswith("recipe: training.step: unknown key; did you mean `steps`?")


@pytest.mark.parametrize(
    ("layers", "expected"),
    [
        ([], "recipe: training.layers: names no layer; list the layers to train, e.g. [8, 9, 10], or leave it out"),
        ([1, 2, 1], "recipe: training.layers: lists layer 1 more than once; list each layer once"),
    ],
)
def test_training_layers_empty_or_repeated(layers, expected):
    assert error_of(recipe(gate_mode="trained", dataset_csv="d.csv", training={"layers": layers})).startswith(expected)


def test_deeply_nested_yaml_is_a_moemerge_error(tmp_path):
    path = tmp_path / "deep.yaml"
    path.write_text("base_model: " + "[" * 1000 + "]" * 1000 + "\n", encoding="utf-8")
    with pytest.raises(MoemergeError):
        load_recipe(path)


def test_unknown_key_with_a_newline_stays_one_line():
    error_of(recipe(**{"gate\nmode": "hidden"}))


# ---------------------------------------------------------------- property: Recipe or MoemergeError, nothing else

REAL_KEYS = [
    "base_model",
    "experts",
    "gate_mode",
    "dtype",
    "experts_per_token",
    "gate_scale",
    "training",
    "dataset_csv",
]
EXPERT_KEYS = ["source_model", "positive_prompts", "negative_prompts", "positive_prompts_file", "name", "noise_scale"]
TRAINING_KEYS = ["steps", "lr", "weight_decay", "batch_size", "max_tokens", "holdout", "seed", "layers"]

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["hidden", "random", "cheap_embed", "uniform_random", "bf16", "float32", "a", "b", "", " "]),
)
keys = st.one_of(
    st.sampled_from(REAL_KEYS + EXPERT_KEYS + TRAINING_KEYS), st.text(max_size=8), st.integers(-3, 3), st.none()
)
anything = st.recursive(
    scalars,
    lambda children: st.one_of(st.lists(children, max_size=4), st.dictionaries(keys, children, max_size=5)),
    max_leaves=20,
)


@st.composite
def mostly(draw, valid: st.SearchStrategy, odds: int = 15) -> object:
    """Usually a valid value, sometimes anything at all, so both outcomes are explored."""
    return draw(anything) if draw(st.integers(0, odds)) == odds else draw(valid)


@st.composite
def maybe_set(draw, fields: dict[str, st.SearchStrategy], required: tuple[str, ...] = ()) -> dict:
    """A mapping with the given keys, each usually present; plus, now and then, an unknown key."""
    out = {}
    for key, value in fields.items():
        if draw(st.integers(0, 29)) != 29 if key in required else draw(st.booleans()):
            out[key] = draw(value)
    if draw(st.integers(0, 9)) == 9:
        out[draw(keys)] = draw(anything)
    return out


paths = st.text(alphabet="abcxyz/._-+ ", min_size=1, max_size=12)
prompts = st.one_of(st.lists(st.text(min_size=1, max_size=6), min_size=1, max_size=3), st.text(max_size=6), st.none())
expert_like = mostly(
    maybe_set(
        {
            "source_model": mostly(paths | st.text(max_size=10)),
            "positive_prompts": mostly(prompts),
            "negative_prompts": mostly(prompts),
            "noise_scale": mostly(st.floats(min_value=0, max_value=1)),
            "residual_scale": mostly(st.floats(min_value=-1, max_value=2)),
            "name": mostly(st.text(max_size=6)),
            "positive_prompts_file": mostly(paths),
            "negative_prompts_file": mostly(paths),
        },
        required=("source_model", "positive_prompts"),
    )
)
recipe_like = maybe_set(
    {
        "base_model": mostly(paths | st.text(max_size=10)),
        "experts": mostly(st.lists(expert_like, min_size=2, max_size=4)),
        "gate_mode": mostly(st.sampled_from(["random", "hidden", "cheap_embed", "uniform_random", "trained"])),
        "dtype": mostly(st.sampled_from(["bf16", "float16", "fp32", "int8"])),
        "experts_per_token": mostly(st.integers(1, 5) | st.integers(-1, 0)),
        "gate_scale": mostly(st.floats(min_value=0.1, max_value=100) | st.floats()),
        "dataset_csv": mostly(paths),
        "training": mostly(
            maybe_set(
                {
                    "steps": mostly(st.integers(-1, 500)),
                    "lr": mostly(st.floats(min_value=0, max_value=1)),
                    "weight_decay": mostly(st.floats(min_value=-0.1, max_value=1)),
                    "batch_size": mostly(st.integers(-1, 64)),
                    "max_tokens": mostly(st.integers(0, 512)),
                    "holdout": mostly(st.floats(min_value=-0.5, max_value=1.5)),
                    "seed": mostly(st.integers()),
                    "layers": mostly(st.lists(st.integers(-2, 40), max_size=4) | st.none()),
                }
            )
        ),
    },
    required=("base_model", "experts"),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(recipe_like, anything))
def test_parse_recipe_returns_recipe_or_moemerge_error(data):
    try:
        loaded = parse_recipe(data)
    except MoemergeError as exc:
        assert str(exc).startswith("recipe")
        return
    assert isinstance(loaded, Recipe)
    names = loaded.expert_names()
    assert len(names) == len(loaded.experts) >= 2
    assert 1 <= loaded.experts_per_token <= len(loaded.experts)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(recipe_like)
def test_yaml_round_trip_returns_recipe_or_moemerge_error(tmp_path_factory, data):
    """The same structures written as YAML text and read by load_recipe."""
    path = tmp_path_factory.mktemp("fuzz") / "recipe.yaml"
    try:
        path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    except (yaml.YAMLError, UnicodeEncodeError):
        return  # not representable as YAML text: nothing a user could write
    try:
        loaded = load_recipe(path)
    except MoemergeError:
        return
    assert isinstance(loaded, Recipe)


@pytest.mark.parametrize(
    ("written", "meant"),
    [("mixtral", "mixtral"), ("Qwen", "qwen2_moe"), ("qwen2_moe", "qwen2_moe"), ("qwen3", "qwen3_moe"), (None, None)],
)
def test_architecture_spellings(written, meant):
    """mergekit-moe's names (qwen, qwen3) mean our formats, so its recipes read unchanged."""
    assert parse_recipe(recipe(architecture=written)).architecture == meant


def test_mergekit_qwen_recipe_with_shared_expert_loads():
    data = recipe(architecture="qwen", shared_experts=[{"source_model": "base", "positive_prompts": ["all"]}])
    parsed = parse_recipe(data)
    assert parsed.architecture == "qwen2_moe"
    assert [s.source_model for s in parsed.shared_experts] == ["base"]
