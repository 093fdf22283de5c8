"""Record readers: every bad input names its file and line."""

import gzip

import pytest

from utils.helper_fns import load_records


@pytest.mark.parametrize("gz", [False, True])
def test_non_utf8_bytes_name_file_line_and_column(tmp_path, gz):
    body = b'{"problem": "ok"}\n{"problem": "caf\xe9"}\n'  # latin-1 e-acute on line 2, column 17
    path = tmp_path / ("bad.jsonl.gz" if gz else "bad.jsonl")
    path.write_bytes(gzip.compress(body) if gz else body)
    with pytest.raises(ValueError, match=r"bad\.jsonl(\.gz)?:2: not UTF-8 text \(byte 0xe9 at column 17\)"):
        load_records(path)


def test_non_utf8_in_a_json_array_names_the_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_bytes(b'[\n  {"problem": "ok"},\n  {"problem": "\xff"}\n]\n')
    with pytest.raises(ValueError, match=r"bad\.json:3: not UTF-8 text \(byte 0xff at column 16\)"):
        load_records(path)


def test_utf8_text_still_reads_in_both_formats(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"problem": "café"}\n\n{"problem": "π"}\n', encoding="utf-8")
    (tmp_path / "b.json").write_text('[{"problem": "café"}]', encoding="utf-8")
    assert load_records(tmp_path / "a.jsonl") == [(f"{tmp_path / 'a.jsonl'}:1", {"problem": "café"}),
                                                  (f"{tmp_path / 'a.jsonl'}:3", {"problem": "π"})]
    assert load_records(tmp_path / "b.json") == [(f"{tmp_path / 'b.json'}[0]", {"problem": "café"})]


def test_yaml_syntax_error_names_file_line_and_column(tmp_path):
    from utils.benchmarks.eval_config import load_eval_config

    bad = tmp_path / "bad.yaml"
    bad.write_text("benchmark: gsm8k\nmax_tokens: [1, 2\ntemperature: 0\n")
    with pytest.raises(ValueError, match=r"bad\.yaml:3:\d+: not valid YAML"):
        load_eval_config(bad, {"max_tokens", "temperature"})
    good = tmp_path / "good.yaml"
    good.write_text("benchmark: gsm8k\nmax-tokens: 5\n")
    assert load_eval_config(good, {"max_tokens"}) == {"benchmark": "gsm8k", "max_tokens": 5}
