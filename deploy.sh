#!/usr/bin/env sh
# Deploy imgsim into PostgreSQL: a thin wrapper over `imgsim deploy` that passes its
# arguments on, e.g.  ./deploy.sh --dsn postgresql://postgres@dbhost/shop --schedule '0 2 * * *'
set -e
here=$(cd "$(dirname "$0")" && pwd)
if [ -x "$here/.venv/bin/imgsim" ]; then exec "$here/.venv/bin/imgsim" deploy "$@"; fi
exec imgsim deploy "$@"
