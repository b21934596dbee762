# shellcheck shell=bash
# Helpers shared by the launch scripts (sourced, not run). The sourcing script
# sets DRY_RUN before calling run().

usage() {
  sed -n '2,/^$/s/^# \{0,1\}//p' "$0"
}

die() {
  local name
  name="$(basename "$0")"
  echo "$name: $*" >&2
  echo "Run 'launch/$name --help' for usage." >&2
  exit 2
}

# Shell-quote arguments only where needed, so printed commands can be pasted.
quote() {
  local out=() arg q="'"
  for arg in "$@"; do
    if [[ "$arg" =~ ^[A-Za-z0-9_./:=@,+%-]+$ ]]; then
      out+=("$arg")
    else
      out+=("$q${arg//$q/$q\\$q$q}$q")
    fi
  done
  echo "${out[*]}"
}

# Print the command under --dry_run, else run it.
run() {
  if ((DRY_RUN)); then
    quote "$@"
  else
    "$@"
  fi
}
