"""The paper's experiments as protocols on one path (`run`): substitution, logit shift, installs; their statistics."""
