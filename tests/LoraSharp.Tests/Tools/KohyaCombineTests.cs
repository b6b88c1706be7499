using LoraSharp.Adapters;
using LoraSharp.Formats;
using LoraSharp.IO;
using LoraSharp.Tests.Infrastructure;
using LoraSharp.Tools;
using TorchSharp;
using static TorchSharp.torch;

namespace LoraSharp.Tests.Tools;

/// <summary>merge-loras under kohya rules (merge_lora.py, svd_merge_lora.py) and the PEFT-only methods.</summary>
public class KohyaCombineTests
{
    static string Lora => ReferenceData.PathOf("sd", "lora", "kohya_lora.safetensors");
    static string Locon => ReferenceData.PathOf("sd", "lora", "kohya_locon.safetensors");

    static Tensor Delta(ModuleAdapterWeights m) =>
        m["lora_up"].reshape(m["lora_up"].shape[0], -1).matmul(m["lora_down"].reshape(m["lora_down"].shape[0], -1)).mul(AdapterScales.Scale(m));

    [Fact]
    public void Linear_merge_sums_factors_with_sqrt_alpha_ratio_and_absolute_ratio_on_up()
    {
        using var result = LoraCombiner.Combine([new LoraInput(Lora, 0.7), new LoraInput(Lora, -0.4)], new CombineOptions { Method = CombineMethod.Linear });
        Assert.Equal(CombineSemantics.Kohya, result.Semantics);
        using var original = AdapterFile.Read(Lora);
        using var scope = NewDisposeScope();
        foreach (var m in original.Weights.Modules)
        {
            var c = result.Weights.Modules.Single(x => x.ModulePath == m.ModulePath);
            Assert.True(c["lora_down"].sub(m["lora_down"].mul(0.3)).abs().max().item<float>() < 1e-6);
            Assert.True(c["lora_up"].sub(m["lora_up"].mul(1.1)).abs().max().item<float>() < 1e-6);
            Assert.Equal(m.Alpha, c.Alpha);
        }
    }

    [Fact]
    public void Linear_merge_of_different_ranks_is_refused_and_concat_keeps_the_first_alpha()
    {
        using var tmp = new TempDir();
        var r2 = tmp.File("r2.safetensors");
        LoraResizer.Resize(Lora, r2, new ResizeOptions { Rank = 2 });
        var e = Assert.Throws<LoraSharpException>(() => LoraCombiner.Combine([new LoraInput(Lora, 1), new LoraInput(r2, 1)], new CombineOptions()));
        Assert.Contains("concat", e.Message);
        using var cat = LoraCombiner.Combine([new LoraInput(Lora, 1), new LoraInput(r2, 1)], new CombineOptions { Method = CombineMethod.Concat });
        Assert.All(cat.Weights.Modules, m => Assert.Equal(6, m["lora_down"].shape[0]));
        Assert.All(cat.Weights.Modules, m => Assert.Equal(2.0, m.Alpha));
    }

    [Fact]
    public void Svd_merge_equals_the_weighted_sum_of_deltas_when_the_rank_suffices_and_writes_alpha_rank()
    {
        using var tmp = new TempDir();
        var output = tmp.File("svd.safetensors");
        using var result = LoraCombiner.CombineFiles([new LoraInput(Lora, 0.7), new LoraInput(Locon, 0.4)], output,
            new CombineOptions { Method = CombineMethod.Svd, Rank = 8, ClampQuantile = 1.0 });
        using var a = AdapterFile.Read(Lora);
        using var b = AdapterFile.Read(Locon);
        using var scope = NewDisposeScope();
        foreach (var m in result.Weights.Modules)
        {
            var expected = Delta(b.Weights.Modules.Single(x => x.ModulePath == m.ModulePath)).mul(0.4);
            var inA = a.Weights.Modules.SingleOrDefault(x => x.ModulePath == m.ModulePath);
            if (inA is not null) expected = expected.add(Delta(inA).mul(0.7));
            Assert.True(Delta(m).sub(expected).abs().max().item<float>() < 1e-5, m.ModulePath);
            Assert.Equal(AdapterScales.RankFor(m), (int)m.Alpha!.Value);
        }
        using var file = SafetensorsFile.Open(output);
        Assert.Equal(AdapterHashes.DataSectionSha256(output), file.Metadata["sshs_model_hash"]);
        Assert.Contains("kohya_lora:0.7", file.Metadata["modelspec.merged_from"]);
    }

    [Fact]
    public void Peft_only_methods_reduce_to_linear_at_density_one_and_dare_is_seeded()
    {
        var dir = ReferenceData.PathOf("llm", "weighted", "adapters");
        LoraInput[] inputs = [new(Path.Combine(dir, "a1"), 0.7), new(Path.Combine(dir, "a2"), 0.4)];
        using var scope = NewDisposeScope();
        using var linear = LoraCombiner.Combine(inputs, new CombineOptions { Method = CombineMethod.Linear });
        foreach (var method in new[] { CombineMethod.MagnitudePrune, CombineMethod.DareLinear })
        {
            using var other = LoraCombiner.Combine(inputs, new CombineOptions { Method = method, Density = 1.0 });
            foreach (var m in linear.Weights.Modules)
                Assert.True(Delta(other.Weights.Modules.Single(x => x.ModulePath == m.ModulePath)).sub(Delta(m)).abs().max().item<float>() < 1e-6, $"{method} {m.ModulePath}");
        }
        using var d1 = LoraCombiner.Combine(inputs, new CombineOptions { Method = CombineMethod.DareTies, Density = 0.5, Seed = 3 });
        using var d2 = LoraCombiner.Combine(inputs, new CombineOptions { Method = CombineMethod.DareTies, Density = 0.5, Seed = 3 });
        using var d3 = LoraCombiner.Combine(inputs, new CombineOptions { Method = CombineMethod.DareTies, Density = 0.5, Seed = 4 });
        var m0 = d1.Weights.Modules[0].ModulePath;
        Assert.True(d1.Weights.Modules[0]["lora_down"].equal(d2.Weights.Modules[0]["lora_down"]).all().item<bool>());
        Assert.False(d1.Weights.Modules[0]["lora_down"].equal(d3.Weights.Modules[0]["lora_down"]).all().item<bool>());
        Assert.Throws<LoraSharpException>(() => LoraCombiner.Combine([new(Lora, 1), new(Lora, 1)], new CombineOptions { Method = CombineMethod.Ties }));
    }

    [Fact]
    public void Ties_elects_the_majority_sign_and_averages_the_agreeing_values()
    {
        using var scope = NewDisposeScope();
        var t1 = tensor(new float[] { 1, -2, 3, 0.1f });
        var t2 = tensor(new float[] { 2, 1, -1, 0.2f });
        // density 0.75 keeps the 3 largest |values| of each: t1 → [1, −2, 3, 0], t2 → [2, 1, −1, 0].
        var merged = TaskArithmetic.Ties([t1, t2], [1.0, 1.0], 0.75);
        // sums: 3 (+), −1 (−), 2 (+), 0 (+ tie): position 1 keeps −2 only, position 2 keeps 3 only, position 3 has no non-zero agreeing.
        Assert.Equal(new float[] { 1.5f, -2, 3, 0 }, merged.data<float>().ToArray());
        var mp = TaskArithmetic.MagnitudePrune(t1, 0.5);
        Assert.Equal(new float[] { 0, -2, 3, 0 }, mp.data<float>().ToArray());
    }
}
