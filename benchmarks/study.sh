# Sourced by the studies' run.sh scripts (run from the repository root).
# run_study OUT OPTIONS...: one sdlora-cil run with OPTIONS into OUT; skipped once OUT/results.json exists, resumed
# from OUT's checkpoints when a run was cut short.
run_study() {
  local out=$1; shift
  [ -f "$out/results.json" ] && return 0
  if [ -f "$out/config.json" ]; then .venv/bin/sdlora-cil --resume "$out"; else .venv/bin/sdlora-cil "$@" --output "$out"; fi
}
