"""The paper's experiments as protocols: substitution, closed-form logit shift, installs, statistics."""
