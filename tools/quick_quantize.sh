#!/usr/bin/env bash
# A menu over the common workflows. It prints the exact command before running it, so the
# direct form (`python tools/quantize.py method=static pretrained=...`) is one copy away.
#
#   tools/quick_quantize.sh                                      # interactive: pick, answer 1-3 questions
#   tools/quick_quantize.sh static pretrained=ckpt.pth           # no questions: CHOICE [key=value ...]
#   tools/quick_quantize.sh --dry-run compare train.epochs=5     # print the command only
#
# CHOICE is a name or its menu number: train static qat kd_qat compare search evaluate benchmark.
# Values are never re-read by a shell: the command is a bash array, printed with printf %q and
# run as is; path values (pretrained=, checkpoint=, dataset.root=, ...) are quoted for hydra.
set -euo pipefail

root=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)
base=""                                  # tools and venv relative to the repo when run from it
[[ $PWD == "$root" ]] || base="$root/"
python=python3                           # the interpreter: $KDQAT_PYTHON, else the project's .venv, else python3
[[ -x "${base}.venv/bin/python" ]] && python="${base}.venv/bin/python"
[[ -n "${KDQAT_PYTHON:-}" ]] && python="$KDQAT_PYTHON"

choices=(train static qat kd_qat compare search evaluate benchmark)
# Keys whose values are paths: quoted for hydra, whose override grammar rejects spaces and ';'.
path_keys='^\+{0,2}(pretrained|checkpoint|run_config|artifact|input|teacher\.ckpt|student\.ckpt|dataset\.root|qat\.qconfig|hydra\.run\.dir|hydra\.sweep\.dir)='

usage() {
  sed -n '2,11s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"
}

die() {
  printf 'error: %s\n' "$1" >&2
  exit 2
}

describe() {  # one menu line per choice: what it does and the command it builds
  case $1 in
    train) echo "train the FP32 model (the teacher)    tools/train_kd_qat.py mode=fp32" ;;
    static) echo "post-training static quantization     tools/quantize.py method=static" ;;
    qat) echo "QAT without a teacher                 tools/quantize.py method=qat" ;;
    kd_qat) echo "KD-QAT, the default recipe            tools/quantize.py method=kd_qat" ;;
    compare) echo "FP32 vs static vs QAT vs KD-QAT       tools/quantize.py method=compare" ;;
    search) echo "per-layer qconfig search              tools/search_qconfig.py" ;;
    evaluate) echo "accuracy of a checkpoint or artifact  tools/evaluate.py checkpoint=..." ;;
    benchmark) echo "CPU latency, size and memory          tools/benchmark.py" ;;
  esac
}

base_command() {  # sets cmd: the interpreter, the tool and the arguments the choice implies
  case $1 in
    train) cmd=("$python" "${base}tools/train_kd_qat.py" mode=fp32) ;;
    static | qat | kd_qat | compare) cmd=("$python" "${base}tools/quantize.py" "method=$1") ;;
    search) cmd=("$python" "${base}tools/search_qconfig.py") ;;
    evaluate) cmd=("$python" "${base}tools/evaluate.py") ;;
    benchmark) cmd=("$python" "${base}tools/benchmark.py") ;;
  esac
}

resolve_choice() {  # a name or menu number -> the name
  local given=$1 i
  for i in "${!choices[@]}"; do
    if [[ $given == "${choices[i]}" || $given == "$((i + 1))" ]]; then
      printf '%s' "${choices[i]}"
      return 0
    fi
  done
  return 1
}

hydra_value() {  # a value as hydra reads it: left bare when plainly safe, else single-quoted
  local value=$1 safe='^[A-Za-z0-9_./@:+~-]*$'
  if [[ $value =~ $safe || $value == \'* || $value == \"* ]]; then
    printf '%s' "$value"
    return
  fi
  value=${value//\'/\\\'}
  [[ $value == *\\ ]] && value+='\'  # a trailing backslash must not escape the closing quote
  printf "'%s'" "$value"
}

add_override() {  # appends key=value to cmd, hydra-quoting the value of path keys
  local arg=$1
  if [[ $arg =~ $path_keys ]]; then
    arg="${arg%%=*}=$(hydra_value "${arg#*=}")"
  fi
  cmd+=("$arg")
}

yaml_default() {  # yaml_default SECTION KEY: a value from configs/train_kd_qat.yaml, shown as a default
  awk -v section="$1:" -v key="$2:" '/^[^ #]/ { top = $1 } top == section && $1 == key { print $2; exit }' \
    "$root/configs/train_kd_qat.yaml"
}

ask() {  # ask PROMPT DEFAULT: the answer, or DEFAULT on an empty line or end of input
  local answer=""
  if [[ -n $2 ]]; then printf '%s [%s]: ' "$1" "$2" >&2; else printf '%s: ' "$1" >&2; fi
  IFS= read -r answer || true
  printf '%s' "${answer:-$2}"
}

interactive() {  # the menu: choice, then checkpoint / dataset / epochs as the choice needs them
  local i answer dataset epochs_key
  echo "KD-QAT for PointNeXt: common workflows (each prints its direct command before it runs)" >&2
  for i in "${!choices[@]}"; do
    printf '  %d) %-10s %s\n' "$((i + 1))" "${choices[i]}" "$(describe "${choices[i]}")" >&2
  done
  printf 'Defaults: dataset synthetic (built in), student %s, teacher %s epochs, QAT %s epochs.\n' \
    "$(awk '/^  - model:/ { print $3; exit }' "$root/configs/train_kd_qat.yaml")" \
    "$(yaml_default teacher epochs)" "$(yaml_default train epochs)" >&2
  answer=$(ask "Choice (number or name)" "kd_qat")
  choice=$(resolve_choice "$answer") || die "unknown choice '$answer'; use 1-${#choices[@]} or one of: ${choices[*]}"
  base_command "$choice"

  case $choice in
    static | qat | kd_qat | compare | benchmark)
      answer=$(ask "FP32 checkpoint, ours or OpenPoints' (pretrained=; empty: the cached or freshly trained teacher)" "")
      [[ -z $answer ]] || add_override "pretrained=$answer" ;;
    search)
      answer=$(ask "FP32 checkpoint (teacher.ckpt=; empty: the cached or freshly trained teacher)" "")
      [[ -z $answer ]] || add_override "teacher.ckpt=$answer" ;;
    evaluate)
      answer=$(ask "Checkpoint: FP32 .pth, RUN/student/last.pt or RUN/model_int8.pt (checkpoint=)" "")
      [[ -n $answer ]] || die "evaluate needs a checkpoint; run again and give its path"
      add_override "checkpoint=$answer" ;;
  esac

  if [[ $choice != benchmark ]]; then
    dataset=$(ask "Dataset: synthetic | modelnet40 | scanobjectnn" "synthetic")
    case $dataset in
      synthetic) ;;
      modelnet40 | scanobjectnn)
        cmd+=("dataset=$dataset")
        answer=$(ask "Dataset root (dataset.root=; empty: configs/dataset/$dataset.yaml)" "")
        [[ -z $answer ]] || add_override "dataset.root=$answer" ;;
      *) die "unknown dataset '$dataset'; use synthetic, modelnet40 or scanobjectnn" ;;
    esac
  fi

  epochs_key=""
  case $choice in
    train) epochs_key=teacher.epochs ;;
    qat | kd_qat | compare) epochs_key=train.epochs ;;
  esac
  if [[ -n $epochs_key ]]; then
    answer=$(ask "Epochs ($epochs_key=)" "$(yaml_default "${epochs_key%%.*}" epochs)")
    [[ $answer =~ ^[0-9]+$ ]] || die "epochs '$answer' is not a whole number; run again with e.g. 3"
    [[ $answer == "$(yaml_default "${epochs_key%%.*}" epochs)" ]] || cmd+=("$epochs_key=$answer")
  fi
}

main() {
  local dry_run=0 args=() arg answer
  for arg in "$@"; do
    case $arg in
      -h | --help) usage; exit 0 ;;
      --dry-run) dry_run=1 ;;
      *) args+=("$arg") ;;
    esac
  done
  cmd=()
  if [[ ${#args[@]} -eq 0 ]]; then
    interactive
  else
    choice=$(resolve_choice "${args[0]}") || die "unknown choice '${args[0]}'; use 1-${#choices[@]} or one of: ${choices[*]}"
    base_command "$choice"
    for arg in "${args[@]:1}"; do
      add_override "$arg"
    done
  fi

  printf 'command: '
  printf '%q ' "${cmd[@]}"
  printf '\n'
  [[ $dry_run -eq 0 ]] || exit 0
  if [[ ${#args[@]} -eq 0 ]]; then
    answer=$(ask "Run it? (y/n)" "y")
    [[ $answer == [yY]* ]] || exit 0
  fi
  exec "${cmd[@]}"
}

main "$@"
