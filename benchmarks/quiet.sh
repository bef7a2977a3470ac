#!/bin/bash
# Run "$@" with the background benchmark processes and their queue scripts paused (SIGSTOP), resuming them however it ends
# Usage: benchmarks/quiet.sh python -m benchmarks.scale --configs 50k --threads 2   (wall-time ratios on a shared machine)
PIDS=$(pgrep -f "benchmarks/logs/q|benchmarks.poisoning|sanitizer certify|benchmarks.harvest_study|benchmarks.adaptive_screen|benchmarks.simple_attacks" | grep -v "^$$\$" | tr '\n' ' ')
trap 'kill -CONT $PIDS 2>/dev/null' EXIT
[ -n "$PIDS" ] && kill -STOP $PIDS
echo "paused: $PIDS" >&2
sleep 1
"$@"
