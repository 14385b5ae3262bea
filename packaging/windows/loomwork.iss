; Inno Setup script for Loomwork on Windows (recipe: run by CI on a Windows runner, not here).
; Input: the PyInstaller one-dir bundle in build\dist\loomwork (packaging\windows\build.ps1 makes it).
; Inno Setup, not NSIS: a CUDA build of torch makes the payload larger than NSIS's 2 GB limit.
#define AppVersion GetEnv("LOOMWORK_VERSION")
#if AppVersion == ""
  #define AppVersion "0.1.0"
#endif

[Setup]
AppId={{6F1E0C53-2B7A-4C1D-9A51-3F7D2C8E9B10}
AppName=Loomwork
AppVersion={#AppVersion}
AppPublisher=Loomwork developers
DefaultDirName={autopf}\Loomwork
DefaultGroupName=Loomwork
OutputDir=..\..\build
OutputBaseFilename=loomwork-{#AppVersion}-windows-x64-setup
Compression=lzma2/fast
SolidCompression=no
DiskSpanning=no
ArchitecturesAllowed=x64compatible
ArchitecturesInstallIn64BitMode=x64compatible
ChangesAssociations=yes
SetupIconFile=..\..\resources\icons\loomwork.ico
UninstallDisplayIcon={app}\loomwork.exe
WizardStyle=modern

[Files]
Source: "..\..\build\dist\loomwork\*"; DestDir: "{app}"; Flags: recursesubdirs createallsubdirs ignoreversion

[Icons]
Name: "{group}\Loomwork"; Filename: "{app}\loomwork.exe"
Name: "{autodesktop}\Loomwork"; Filename: "{app}\loomwork.exe"; Tasks: desktopicon

[Tasks]
Name: "desktopicon"; Description: "Create a desktop shortcut"; Flags: unchecked

[Registry]
; .loom files open in Loomwork
Root: HKA; Subkey: "Software\Classes\.loom"; ValueType: string; ValueName: ""; ValueData: "Loomwork.Graph"; Flags: uninsdeletevalue
Root: HKA; Subkey: "Software\Classes\Loomwork.Graph"; ValueType: string; ValueName: ""; ValueData: "Loomwork graph"; Flags: uninsdeletekey
Root: HKA; Subkey: "Software\Classes\Loomwork.Graph\DefaultIcon"; ValueType: string; ValueName: ""; ValueData: "{app}\loomwork.exe,0"
Root: HKA; Subkey: "Software\Classes\Loomwork.Graph\shell\open\command"; ValueType: string; ValueName: ""; ValueData: """{app}\loomwork.exe"" ""%1"""

[Run]
Filename: "{app}\loomwork.exe"; Parameters: "--smoke"; StatusMsg: "Checking the installation..."; Flags: runhidden waituntilterminated
Filename: "{app}\loomwork.exe"; Description: "Start Loomwork"; Flags: nowait postinstall skipifsilent
