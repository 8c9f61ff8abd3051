"""The fault-injection hook (testing/faults.py): what LOWVRAM_FT_FAULT accepts, and that anything else is
one clear line (a UserError, exit 2), not a traceback from inside the training run."""
from __future__ import annotations

import pytest

from lowvram_ft.errors import UserError
from lowvram_ft.testing.faults import FAULT_ENV, fault_callbacks, planned_faults


def test_planned_faults_are_read_from_the_variable():
    env = {FAULT_ENV: "kill@step=3, kill@checkpoint=4,oom@step=1"}
    assert planned_faults(env) == {("kill", "step", 3), ("kill", "checkpoint", 4), ("oom", "step", 1)}
    assert planned_faults({}) == set() and fault_callbacks({}) == []


@pytest.mark.parametrize("spec", ["explode@step=3", "kill@epoch=1", "kill@step=x", "kill"])
def test_an_unknown_fault_is_one_user_error_line(spec):
    with pytest.raises(UserError) as info:
        fault_callbacks({FAULT_ENV: spec})
    assert info.value.exit_code == 2
    (line,) = info.value.lines()
    assert FAULT_ENV in line and "kill@step=N" in line
