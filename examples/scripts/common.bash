# Sourced by every script here: `--help`, `--dry_run` and nothing else on the command line (settings
# are environment variables), so that a script asked for help never submits a job.
#
#   parse_args "$@"      --help: print the script's header and settings, exit 0; --dry_run: DRY_RUN=1;
#                        anything else: one line on stderr, exit 2
#   run CMD ARGS...      run it, or under --dry_run print it as one shell-quoted line
#   run_to FILE CMD ...  the same, stdout into FILE

DRY_RUN=

usage() {
    # The comment block at the top of the script, then its settings with their defaults.
    sed -n '2,/^set -euo pipefail/{/^#/{s/^# \{0,1\}//;p;};}' "$0"
    echo
    echo "Settings (environment variables, default after :-):"
    grep -E '^[A-Z_]+=\$\{' "$0" | sed 's/^/  /'
    echo
    echo "Arguments: --help (this text), --dry_run (print each command instead of running it)"
}

parse_args() {
    local arg
    for arg in "$@"; do
        case "$arg" in
            -h | --help) usage; exit 0 ;;
            --dry_run) DRY_RUN=1 ;;
            *)
                echo "$(basename "$0"): unknown argument '$arg': takes --help or --dry_run (settings are environment variables)" >&2
                exit 2
                ;;
        esac
    done
}

quote() {
    # Shell words as Python's shlex.join writes them: plain words bare, others in single quotes.
    local word words=()
    for word in "$@"; do
        if [[ "$word" =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
            words+=("$word")
        else
            words+=("'${word//\'/\'\"\'\"\'}'")
        fi
    done
    echo "${words[*]}"
}

run() {
    if [ -n "$DRY_RUN" ]; then quote "$@"; else "$@"; fi
}

run_to() {
    local file=$1
    shift
    if [ -n "$DRY_RUN" ]; then echo "$(quote "$@") > $(quote "$file")"; else "$@" >"$file"; fi
}
