# Shared by the launch scripts (sourced, not run): error exit, shell quoting, --dry-run.
# Callers set PROG (their name, for messages) and DRY_RUN (0 or 1).

die() { echo "${PROG:-launch}: $*" >&2; exit 2; }

# The arguments as one line of POSIX shell: safe words bare, the rest in single quotes
# (what --dry-run prints, and how a command is packed into a remote `--command` string).
quote() {
  local a sep=""
  for a in "$@"; do
    if [[ "$a" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then printf '%s%s' "$sep" "$a"
    else printf "%s'%s'" "$sep" "${a//\'/\'\\\'\'}"
    fi
    sep=" "
  done
}

# Runs a command, or with DRY_RUN=1 prints it (quoted, one line) instead.
run() {
  if ((${DRY_RUN:-0})); then
    quote "$@"
    printf '\n'
  else
    "$@"
  fi
}
