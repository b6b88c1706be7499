using System.Text.Json.Nodes;
using LoraSharp.Formats;
using LoraSharp.IO;
using LoraSharp.Tests.Infrastructure;
using LoraSharp.Tools;
using TorchSharp;
using static TorchSharp.torch;

namespace LoraSharp.Tests.Tools;

/// <summary>merge-loras under PEFT rules reproduces add_weighted_adapter for every combination in llm/weighted.</summary>
public class PeftCombineReferenceTests
{
    static JsonObject Weighted => (JsonObject)ReferenceData.ReadJson("llm", "weighted", "weighted.json");

    public static TheoryData<string> Combos()
    {
        var data = new TheoryData<string>();
        foreach (var (name, _) in (JsonObject)Weighted["combos"]!) data.Add(name);
        return data;
    }

    static CombineResult Run(string combo)
    {
        var spec = (JsonObject)Weighted["combos"]![combo]!;
        var weights = Weighted["weights"]!.AsArray().Select(w => w!.GetValue<double>()).ToArray();
        var type = spec["combination_type"]!.GetValue<string>();
        var dir = ReferenceData.PathOf("llm", "weighted", "adapters");
        return LoraCombiner.Combine(
            [new LoraInput(Path.Combine(dir, "a1"), weights[0]), new LoraInput(Path.Combine(dir, "a2"), weights[1])],
            new CombineOptions
            {
                Method = LoraCombiner.ParseMethod(type),
                Rank = spec["svd_rank"]?.GetValue<int>(),
                Semantics = CombineSemantics.Peft,
            });
    }

    static Tensor DeltaOf(LoraSharp.Adapters.ModuleAdapterWeights m) =>
        m["lora_up"].matmul(m["lora_down"]).mul(AdapterScales.Scale(m));

    [Theory]
    [MemberData(nameof(Combos))]
    public void Combined_adapter_deltas_equal_peft(string combo)
    {
        using var scope = NewDisposeScope();
        using var result = Run(combo);
        Assert.Equal(CombineSemantics.Peft, result.Semantics);
        var expectedRank = Weighted["results"]![combo]!["r"]!.GetValue<int>();
        Assert.All(result.Weights.Modules, m => Assert.Equal(expectedRank, m["lora_down"].shape[0]));
        Assert.All(result.Weights.Modules, m => Assert.Equal(1.0, AdapterScales.Scale(m)));
        using var reference = SafetensorsFile.Open(ReferenceData.PathOf("llm", "weighted", "weighted.safetensors"));
        var prefix = $"delta.{combo}.";
        var keys = reference.Keys.Where(k => k.StartsWith(prefix, StringComparison.Ordinal)).ToList();
        Assert.NotEmpty(keys);
        foreach (var key in keys)
        {
            var module = key[prefix.Length..^".weight".Length];
            var ours = result.Weights.Modules.Single(m => m.ModulePath == module);
            var expected = reference.Load(key);
            var diff = DeltaOf(ours).sub(expected).abs().max().item<float>();
            Assert.True(diff < 1e-5, $"{combo} {module}: max |ΔW − PEFT| = {diff}");
        }
        // Every module either adapter targets is in the combination.
        var targets = Weighted["results"]![combo]!["target_modules"]!.AsArray().Select(t => t!.GetValue<string>()).ToHashSet();
        Assert.Equal(targets, result.Weights.Modules.Select(m => m.ModulePath[(m.ModulePath.LastIndexOf('.') + 1)..]).ToHashSet());
    }

    [Theory]
    [InlineData("linear")]
    [InlineData("cat")]
    public void Combined_factors_equal_the_saved_peft_adapter(string combo)
    {
        using var scope = NewDisposeScope();
        using var result = Run(combo);
        using var reference = AdapterFile.Read(ReferenceData.PathOf("llm", "weighted", "adapters", combo));
        Assert.Equal(reference.Weights.Modules.Count, result.Weights.Modules.Count);
        foreach (var expected in reference.Weights.Modules)
        {
            var ours = result.Weights.Modules.Single(m => m.ModulePath == expected.ModulePath);
            foreach (var name in new[] { "lora_down", "lora_up" })
            {
                var diff = ours[name].sub(expected[name]).abs().max().item<float>();
                Assert.True(diff < 1e-6, $"{combo} {expected.ModulePath} {name}: max diff {diff}");
            }
            Assert.Equal(AdapterScales.Scale(expected), AdapterScales.Scale(ours), 12);
        }
    }

    [Fact]
    public void Written_peft_folder_reads_back_with_the_same_deltas()
    {
        using var tmp = new TempDir();
        var dir = ReferenceData.PathOf("llm", "weighted", "adapters");
        var output = tmp.File("svd");
        using var result = LoraCombiner.CombineFiles(
            [new LoraInput(Path.Combine(dir, "a1"), 0.7), new LoraInput(Path.Combine(dir, "a2"), 0.4)], output,
            new CombineOptions { Method = CombineMethod.Svd, Rank = 4 });
        using var back = AdapterFile.Read(output);
        Assert.NotNull(back.PeftConfig);
        Assert.Equal(4, back.PeftConfig!.R);
        using var scope = NewDisposeScope();
        foreach (var m in result.Weights.Modules)
        {
            var read = back.Weights.Modules.Single(b => b.ModulePath == m.ModulePath);
            Assert.True(DeltaOf(read).sub(DeltaOf(m)).abs().max().item<float>() < 1e-6);
        }
    }
}
