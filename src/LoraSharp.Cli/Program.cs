return LoraSharp.Cli.CommandLine.Run(args);
