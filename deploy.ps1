# Deploy imgsim into PostgreSQL: a thin wrapper over `imgsim deploy` that passes its
# arguments on, e.g.  .\deploy.ps1 --dsn postgresql://postgres@dbhost/shop --schedule '0 2 * * *'
# (Not tested: PowerShell was not available where imgsim is developed.)
$imgsim = Join-Path $PSScriptRoot ".venv/bin/imgsim"
if (-not (Test-Path $imgsim)) { $imgsim = Join-Path $PSScriptRoot ".venv/Scripts/imgsim.exe" }
if (-not (Test-Path $imgsim)) { $imgsim = "imgsim" }
& $imgsim deploy @args
exit $LASTEXITCODE
