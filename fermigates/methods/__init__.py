"""Ways of deciding what to cut, one folder each. Everything after the decision (shrink, calibration,
checkpoints, reports) is shared and does not know which method ran."""
