# Sourced by the GPU scripts (run from the repository root on a machine where the project is not installed):
# pyproject's package-dir mapping (train/ -> emoverse.train, ...) as links under .gpu-path, put on the path.
mkdir -p .gpu-path/emoverse
for f in emoverse/*.py; do ln -sf "$(pwd)/$f" .gpu-path/emoverse/; done
for d in sources pipelines; do ln -sfn "$(pwd)/emoverse/$d" ".gpu-path/emoverse/$d"; done
for d in train compress export runtime bench; do ln -sfn "$(pwd)/$d" ".gpu-path/emoverse/$d"; done
export PYTHONPATH="$(pwd)/.gpu-path${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONSAFEPATH=1  # else `python -m` / `python -c` put the cwd first, whose emoverse/ lacks train/, runtime/, ...
