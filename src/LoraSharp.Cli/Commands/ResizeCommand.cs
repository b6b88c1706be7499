using System.CommandLine;
using LoraSharp.Tools;

namespace LoraSharp.Cli.Commands;

/// <summary><c>lorasharp resize IN --rank R | --dynamic M --value V --out OUT</c>: change the rank of a LoRA.</summary>
public static class ResizeCommand
{
    public static Command Create()
    {
        var input = new Argument<string>("input") { Description = "LoRA / LoCon file (kohya, diffusers) or PEFT folder." };
        var rank = new Option<int>("--rank") { Description = "New rank (the cap with --dynamic).", DefaultValueFactory = _ => 4 };
        var convRank = new Option<int?>("--conv-rank") { Description = "New rank of conv modules (default --rank)." };
        var dynamic = new Option<string?>("--dynamic") { Description = "sv_ratio | sv_fro | sv_cumulative." };
        var value = new Option<double>("--value") { Description = "Parameter of the dynamic method." };
        var output = new Option<string>("--out") { Description = "Output file or folder (same layout as the input).", Required = true };
        var dtype = new Option<string?>("--save-dtype") { Description = "fp16, bf16 or fp32 (default: the input's dtype)." };
        var verbose = new Option<bool>("--verbose") { Description = "One line per module: sum(S) and Frobenius norm retained." };
        var command = new Command("resize", "Resize a LoRA to a lower (or dynamic) rank, keeping ΔW (kohya resize_lora).")
        {
            input, rank, convRank, dynamic, value, output, dtype, verbose,
        };
        command.SetAction(parse => CliErrors.Run(() =>
        {
            var report = LoraResizer.Resize(parse.GetValue(input)!, parse.GetValue(output)!, new ResizeOptions
            {
                Rank = parse.GetValue(rank),
                ConvRank = parse.GetValue(convRank),
                Dynamic = LowRank.ParseDynamic(parse.GetValue(dynamic)),
                DynamicValue = parse.GetValue(value),
                SaveDType = ConvertCommand.ParseDType(parse.GetValue(dtype)),
            });
            var text = report.ToText();
            if (parse.GetValue(verbose)) Console.Write(text);
            else Console.Write(text.Split('\n', StringSplitOptions.RemoveEmptyEntries).LastOrDefault() + "\n");
            Console.WriteLine($"wrote {report.Output}");
            return 0;
        }));
        return command;
    }
}
