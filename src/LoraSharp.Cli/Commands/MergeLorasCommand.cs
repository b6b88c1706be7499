using System.CommandLine;
using LoraSharp.Tools;

namespace LoraSharp.Cli.Commands;

/// <summary><c>lorasharp merge-loras A:w B:w --out OUT [--method …]</c>: combine LoRAs into one (kohya or PEFT rules).</summary>
public static class MergeLorasCommand
{
    public static Command Create()
    {
        var inputs = new Argument<string[]>("loras") { Description = "Adapter files or PEFT folders, each optionally :WEIGHT (default 1).", Arity = ArgumentArity.OneOrMore };
        var output = new Option<string>("--out") { Description = "Output file (kohya rules) or folder (PEFT rules).", Required = true };
        var method = new Option<string>("--method") { Description = "linear | concat (cat) | svd; PEFT rules also ties | dare_linear | dare_ties | magnitude_prune.", DefaultValueFactory = _ => "linear" };
        var rank = new Option<int?>("--rank") { Description = "SVD rank (default: the largest input rank)." };
        var convRank = new Option<int?>("--conv-rank") { Description = "SVD rank of k×k convs (default: --rank)." };
        var clamp = new Option<double?>("--clamp-quantile") { Description = "Clamp SVD factors at this quantile (kohya: 0.99 by default; PEFT: none)." };
        var density = new Option<double>("--density") { Description = "Density for ties / dare_* / magnitude_prune.", DefaultValueFactory = _ => 1.0 };
        var sign = new Option<string>("--majority-sign") { Description = "total | frequency (ties, dare_ties).", DefaultValueFactory = _ => "total" };
        var seed = new Option<long>("--seed") { Description = "Seed of the DARE masks.", DefaultValueFactory = _ => 0 };
        var rules = new Option<string>("--rules") { Description = "auto | kohya | peft (auto: PEFT when every input is a PEFT folder).", DefaultValueFactory = _ => "auto" };
        var model = new Option<string?>("--model") { Description = "Base model, to resolve kohya names to module paths (optional)." };
        var dtype = new Option<string?>("--save-dtype") { Description = "fp16, bf16 or fp32." };
        var command = new Command("merge-loras", "Combine several LoRAs into one: kohya merge_lora / svd_merge_lora, or PEFT add_weighted_adapter.")
        {
            inputs, output, method, rank, convRank, clamp, density, sign, seed, rules, model, dtype,
        };
        command.SetAction(parse => CliErrors.Run(() =>
        {
            var list = parse.GetValue(inputs)!.Select(LoraInput.Parse).ToList();
            var options = new CombineOptions
            {
                Method = LoraCombiner.ParseMethod(parse.GetValue(method)!),
                Semantics = parse.GetValue(rules)!.ToLowerInvariant() switch
                {
                    "auto" => CombineSemantics.Auto,
                    "kohya" => CombineSemantics.Kohya,
                    "peft" => CombineSemantics.Peft,
                    var r => throw new LoraSharpException($"unknown rules '{r}' (expected auto, kohya or peft)", null, "--rules"),
                },
                Rank = parse.GetValue(rank),
                ConvRank = parse.GetValue(convRank),
                ClampQuantile = parse.GetValue(clamp),
                Density = parse.GetValue(density),
                MajoritySign = parse.GetValue(sign)!,
                Seed = parse.GetValue(seed),
                ModelPath = parse.GetValue(model),
                SaveDType = ConvertCommand.ParseDType(parse.GetValue(dtype)),
            };
            using var result = LoraCombiner.CombineFiles(list, parse.GetValue(output)!, options);
            for (int i = 0; i < list.Count; i++)
                Console.WriteLine($"{list[i].Path} × {list[i].Ratio}: {result.Coverage[i].TargetedModules.Count} modules");
            Console.WriteLine($"wrote {parse.GetValue(output)} ({result.Weights.Modules.Count} modules, {options.Method}, {result.Semantics} rules)");
            return 0;
        }));
        return command;
    }
}
