using System.CommandLine;
using LoraSharp.Tools;

namespace LoraSharp.Cli.Commands;

/// <summary><c>lorasharp extract --base A --tuned B --rank R --out OUT</c>: a LoRA from the difference of two models.</summary>
public static class ExtractCommand
{
    public static Command Create()
    {
        var baseModel = new Option<string>("--base") { Description = "Original model (SD single file, diffusers folder, HF folder).", Required = true };
        var tuned = new Option<string>("--tuned") { Description = "Fine-tuned model of the same architecture.", Required = true };
        var rank = new Option<int>("--rank") { Description = "Rank of Linear / 1×1 modules (kohya --dim).", DefaultValueFactory = _ => 4 };
        var convRank = new Option<int?>("--conv-rank") { Description = "Rank of 3×3 convs (also extracts resnet / down / up convs)." };
        var clamp = new Option<double>("--clamp-quantile") { Description = "Clamp both factors at this quantile of |values|.", DefaultValueFactory = _ => 0.99 };
        var minDiff = new Option<double>("--min-diff") { Description = "Skip the text encoder when no weight differs by more than this.", DefaultValueFactory = _ => 0.01 };
        var dynamic = new Option<string?>("--dynamic") { Description = "sv_ratio | sv_fro | sv_cumulative: rank per module (capped at --rank)." };
        var value = new Option<double>("--value") { Description = "Parameter of the dynamic method." };
        var svd = new Option<string>("--svd") { Description = "auto | full | randomized.", DefaultValueFactory = _ => "auto" };
        var output = new Option<string>("--out") { Description = "Output: kohya .safetensors (SD) or PEFT folder (LLM).", Required = true };
        var dtype = new Option<string?>("--save-dtype") { Description = "fp16, bf16 or fp32 (default fp32)." };
        var verbose = new Option<bool>("--verbose") { Description = "One line per module (rank, energy kept, SVD method)." };
        var command = new Command("extract", "Extract a LoRA from a fine-tuned model (kohya extract_lora_from_models).")
        {
            baseModel, tuned, rank, convRank, clamp, minDiff, dynamic, value, svd, output, dtype, verbose,
        };
        command.SetAction(parse => CliErrors.Run(() =>
        {
            var report = LoraExtractor.Extract(parse.GetValue(baseModel)!, parse.GetValue(tuned)!, parse.GetValue(output)!, new ExtractOptions
            {
                Rank = parse.GetValue(rank),
                ConvRank = parse.GetValue(convRank),
                ClampQuantile = parse.GetValue(clamp),
                MinDiff = parse.GetValue(minDiff),
                Dynamic = LowRank.ParseDynamic(parse.GetValue(dynamic)),
                DynamicValue = parse.GetValue(value),
                SvdMethod = parse.GetValue(svd)!.ToLowerInvariant() switch
                {
                    "auto" => SvdMethod.Auto,
                    "full" => SvdMethod.Full,
                    "randomized" => SvdMethod.Randomized,
                    var s => throw new LoraSharpException($"unknown SVD method '{s}' (expected auto, full or randomized)", null, "--svd"),
                },
                SaveDType = ConvertCommand.ParseDType(parse.GetValue(dtype)),
            });
            if (parse.GetValue(verbose))
                foreach (var m in report.Modules)
                    Console.WriteLine($"{m.Module,-80} [{string.Join("×", m.Shape)}] rank {m.Rank,4}  energy kept {m.EnergyRetained:P2}  {m.Method} {m.Seconds * 1000:F0} ms");
            if (!double.IsNaN(report.TextEncoderMaxDiff))
                Console.WriteLine($"text encoder: max |ΔW| = {report.TextEncoderMaxDiff:G4}{(report.TextEncoderSkipped ? " < min-diff: skipped" : "")}");
            if (report.Modules.Count > 0)
                Console.WriteLine($"wrote {report.Output}: {report.Modules.Count} modules, mean energy kept {report.Modules.Average(m => m.EnergyRetained):P2}, "
                    + $"{report.Modules.Count(m => m.Method == SvdMethod.Randomized)} randomized SVDs, {report.Seconds:F1} s");
            return 0;
        }));
        return command;
    }
}
