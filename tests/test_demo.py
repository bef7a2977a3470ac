import json

from sanitizer.cli import main
from sanitizer.demo import DemoConfig, run_demo


def test_demo_runs_end_to_end_in_reduced_size(tmp_path):
    out = run_demo(tmp_path, DemoConfig(trials=1, defenses=("none", "density"), quick=True))
    rows = out["rows"]
    assert [r["defense"] for r in rows] == ["none", "density"]
    none, density = rows
    assert none["dropped"] == 0 and density["dropped"] > 0
    assert 0 <= density["poisons_caught"] <= density["poisons"] == none["poisons"] > 0
    assert 0.0 <= none["clean_accuracy"] <= 1.0
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["summary"][1]["defense"] == "density"
    assert "| density |" in (tmp_path / "report.md").read_text()
    report = (tmp_path / "report" / "report.html").read_text()
    assert "data:image/png;base64," in report
    assert json.loads((tmp_path / "certificate.json").read_text())["audit"]["rounds"]


def test_cli_lists_demo(capsys):
    try:
        main(["demo", "--help"])
    except SystemExit as exc:
        assert exc.code == 0
    assert "--trials" in capsys.readouterr().out


def test_demo_runs_on_one_torch_thread_and_restores_the_count(monkeypatch, tmp_path):
    import torch

    import sanitizer.demo as demo

    seen = []
    monkeypatch.setattr(demo, "_run_demo", lambda out, cfg: seen.append(torch.get_num_threads()) or {})
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert demo.run_demo(tmp_path) == {} and seen == [1]
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
