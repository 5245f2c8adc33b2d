# Sourced by run_tests.sh and the run scripts: make (once) and activate the virtual environment in $VENV
# (default .venv). It is created with --system-site-packages, so an installed torch (a GPU box's CUDA build, say)
# is reused rather than replaced; requirements are installed again only when the requirements file changes.
# Usage: source setup_env.sh REQUIREMENTS_FILE. It also defines stage(), which the run scripts use.
_req="${1:?usage: source setup_env.sh REQUIREMENTS_FILE}"
VENV="${VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating virtual environment $VENV (reusing system packages such as torch)"
  python3 -m venv --system-site-packages "$VENV"
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"
_stamp="$VENV/.installed-$(basename "$_req")"
_hash="$(python3 -c 'import hashlib, sys; print(hashlib.sha256(b"".join(open(f, "rb").read() for f in sys.argv[1:])).hexdigest())' "$_req" requirements.txt)"
if [ "$(cat "$_stamp" 2>/dev/null)" != "$_hash" ]; then
  echo "setup: installing $_req into $VENV"
  python -m pip install -q --disable-pip-version-check -r "$_req"
  echo "$_hash" > "$_stamp"
fi
unset _req _stamp _hash

stage() {  # stage NAME COMMAND...: announce, run, and stop the script with the stage's name if it fails
  local name=$1; shift
  echo; echo "=== $name"
  "$@" || { echo "error: stage '$name' failed (exit $?)" >&2; exit 1; }
}
split_words() {  # split_words ARRAY VARIABLE: ARRAY = the words of $VARIABLE as a shell splits a command line
  # (quotes group words: TRAIN_ARGS="--sample-prompts 'Once upon a time'"), nothing in it expanded or run; a quote
  # left open stops the script with one line naming VARIABLE
  local _word
  python -c '
import shlex, sys
try:
    shlex.split(sys.argv[1])
except ValueError as e:  # shlex refuses a trailing backslash (No escaped character) and an open quote
    what = ("ends with a backslash that escapes nothing (a line continuation inside the quotes?); remove it"
            if "escaped" in str(e) else "has a quote that is not closed")
    sys.exit(f"error: {sys.argv[2]} {what}: {sys.argv[1]}")' "${!2:-}" "$2" || exit 2
  eval "$1=()"
  while IFS= read -r -d '' _word; do
    eval "$1+=(\"\$_word\")"
  done < <(python -c 'import shlex, sys; sys.stdout.write("".join(w + "\0" for w in shlex.split(sys.argv[1])))' "${!2:-}")
}
replace_unfinished_data() {  # replace_unfinished_data DIR: --overwrite when DIR holds an interrupted data_prep.py
  # build (files but no manifest.json, which is written last), so a re-run of a run script starts the preparation
  # again instead of stopping at data_prep.py's refusal; a finished build, or one of other settings, is left to it
  if [ -d "$1" ] && [ -n "$(ls -A "$1")" ] && [ ! -e "$1/manifest.json" ]; then
    echo "--overwrite"
  fi
}
