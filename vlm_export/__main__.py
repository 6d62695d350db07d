from vlm_export.cli.entry import main

main()
