# Windows recipe (for a CI matrix runner with Python 3.11 and Inno Setup 6 installed):
#   pwsh packaging/windows/build.ps1 [-Cuda]
# Builds the PyInstaller bundle, smoke-tests it, then the Inno Setup installer into build\.
param([switch]$Cuda)
$ErrorActionPreference = "Stop"
Set-Location (Join-Path $PSScriptRoot "..\..")
python -m venv build\venv
$py = "build\venv\Scripts\python.exe"
& $py -m pip install --upgrade pip
if ($Cuda) {
    # CUDA wheels of torch come from PyTorch's own package index on Windows; the CI job sets
    # TORCH_INDEX_URL to it (a CUDA build is ~3 GB, which is why the installer is Inno Setup).
    if (-not $env:TORCH_INDEX_URL) { throw "set TORCH_INDEX_URL to PyTorch's CUDA wheel index" }
    & $py -m pip install torch torchvision --index-url $env:TORCH_INDEX_URL
}
& $py -m pip install -e ".[package]"
& $py -m PyInstaller --noconfirm --clean --distpath build\dist --workpath build\work packaging\loomwork.spec
$env:QT_QPA_PLATFORM = "offscreen"
& build\dist\loomwork\loomwork.exe --smoke
if ($LASTEXITCODE -ne 0) { throw "smoke test of the bundle failed" }
$env:LOOMWORK_VERSION = (& $py -c "import tomllib;print(tomllib.load(open('pyproject.toml','rb'))['project']['version'])")
& "${env:ProgramFiles(x86)}\Inno Setup 6\ISCC.exe" packaging\windows\loomwork.iss
if ($LASTEXITCODE -ne 0) { throw "Inno Setup failed" }
Get-ChildItem build\*.exe | ForEach-Object { "{0}  {1:N0} MB" -f $_.FullName, ($_.Length / 1MB) }
