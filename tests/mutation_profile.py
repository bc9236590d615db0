"""A pytest plugin for mutation runs only (pyproject.toml's [tool.mutmut] pytest_add_cli_args loads it with -p): hypothesis
without shrinking and without its example database. A mutant is killed by the first failing example; shrinking it (which
can take minutes) and replaying examples that killed earlier mutants would only slow the run and make a verdict depend on
the order mutants ran in. With --hypothesis-seed each mutant sees the same examples."""
from hypothesis import Phase, settings

settings.register_profile("mutation", database=None, phases=[Phase.explicit, Phase.generate])
settings.load_profile("mutation")
