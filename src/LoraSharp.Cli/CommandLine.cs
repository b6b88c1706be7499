using System.CommandLine;

namespace LoraSharp.Cli;

/// <summary>The `lorasharp` root command: each verb lives in its own file and registers here.</summary>
public static class CommandLine
{
    public static RootCommand Build()
    {
        var root = new RootCommand("LoraSharp: train, load, combine, convert and generate with LoRA adapters.");
        root.Subcommands.Add(Commands.InspectCommand.Create());
        root.Subcommands.Add(Commands.ConvertCommand.Create());
        root.Subcommands.Add(Commands.MergeCommand.Create());
        root.Subcommands.Add(Commands.MergeLorasCommand.Create());
        root.Subcommands.Add(Commands.ExtractCommand.Create());
        root.Subcommands.Add(Commands.ResizeCommand.Create());
        root.Subcommands.Add(Commands.PngInfoCommand.Create());
        root.Subcommands.Add(Commands.GenerateCommand.Create());
        root.Subcommands.Add(Commands.GridCommand.Create());
        root.Subcommands.Add(Commands.TrainCommand.Create());
        root.Subcommands.Add(Commands.TrainLlmCommand.Create());
        root.Subcommands.Add(Commands.GenerateTextCommand.Create());
        root.Subcommands.Add(Commands.MergeAdapterCommand.Create());
        root.Subcommands.Add(Commands.DemoCommand.Create());
        root.Subcommands.Add(Commands.QuickstartCommand.Create());
        root.Subcommands.Add(Commands.QuickstartLlmCommand.Create());
        return root;
    }

    public static int Run(string[] args) => Build().Parse(args).Invoke();
}
