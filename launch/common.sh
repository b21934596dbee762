# shellcheck shell=bash
# Helpers shared by the launch scripts (sourced, not run). The sourcing script
# sets DRY_RUN before calling run().

usage() {
  sed -n '2,/^$/s/^# \{0,1\}//p' "$0"
}

# parse_options VALUE_OPTIONS FLAG_OPTIONS ARGS...: each name in the space-separated
# VALUE_OPTIONS takes a value (--name=V or --name V) into the variable of the same
# name upper-cased (--process_id -> PROCESS_ID), each name in FLAG_OPTIONS sets its
# variable to 1, -h/--help prints the usage, the words after -- go to EXTRA and any
# other word to POSITIONAL.
# shellcheck disable=SC2034  # EXTRA is read by the sourcing script
parse_options() {
  local value_options=" $1 " flag_options=" $2 " opt value var
  shift 2
  POSITIONAL=()
  while (($#)); do
    opt="$1"
    value=
    if [[ "$opt" == --*=* ]]; then
      value="${opt#*=}"
      opt="${opt%%=*}"
    fi
    var="$(tr '[:lower:]' '[:upper:]' <<<"${opt#--}")"
    case "$opt" in
      -h | --help) usage; exit 0 ;;
      --) shift; EXTRA=("$@"); return ;;
      -*)
        if [[ "$flag_options" == *" ${opt#--} "* ]]; then
          printf -v "$var" 1
        elif [[ "$value_options" == *" ${opt#--} "* ]]; then
          if [[ -z "$value" ]]; then
            (($# >= 2)) || die "$opt needs a value"
            value="$2"
            shift
          fi
          printf -v "$var" '%s' "$value"
        else
          die "unknown option $opt"
        fi
        ;;
      *) POSITIONAL+=("$opt") ;;
    esac
    shift
  done
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
