from vlm_export.cli.app import main

main()
