"""``graphopt optimize MODEL --goal ...``: the search from the command line, and its usage errors."""

import pytest

from tests.e2e.test_cli import error_lines, run_cli


@pytest.mark.parametrize("argv, says", [
    (["--goal", "quality>=0.9", "--pipeline", "quantize"], "give --pipeline or --goal, not both"),
    (["--front", "f.png"], "--front draws a search: give --goal too"),
    (["--goal", "quality>=0.9,speed>=2"], "--goal: goal term 'speed>=2': no setting 'speed'; did you mean 'speedup'?"),
    (["--goal", "quality>=0.9,objective=size,passes=[fold_bn]"], "--goal: passes=[fold_bn]: fold_bn declares no"),
])
def test_a_bad_goal_exits_2_before_the_model_loads(capsys, argv, says):
    code, _, err = run_cli(capsys, "optimize", "no/such/model", *argv, "-q")
    assert code == 2
    assert says in error_lines(err)[0]


def test_a_goal_search_prints_its_points_and_front_and_the_chosen_pipeline(capsys, text_model_dir, tmp_path):
    front = tmp_path / "front.png"
    code, out, err = run_cli(capsys, "optimize", str(text_model_dir), "--goal",
                             "quality>=0.99,objective=size,passes=[quantize],max_time=600", "--calib-size", "16",
                             "--eval-size", "16", "--front", str(front), "-q")
    assert code == 0, err
    assert "search for quality>=0.99,objective=size,max_time=600,passes=[quantize]: 5 points measured" in out
    assert "| * | remove_dropout,fold_bn,quantize(scheme=int4,method=gptq) " in out  # the smallest of the five
    assert "pipeline: remove_dropout,fold_bn,quantize(scheme=int4,method=gptq)\n" in out
    assert front.stat().st_size > 10_000
