using LoraSharp.Adapters;
using LoraSharp.Formats;
using LoraSharp.IO;
using LoraSharp.Tests.Infrastructure;
using LoraSharp.Tools;
using TorchSharp;
using static TorchSharp.torch;

namespace LoraSharp.Tests.Tools;

/// <summary>resize: lossless at full rank, top singular values at lower rank, kohya's rank rules, metadata and hashes.</summary>
public class ResizeTests
{
    static string Locon => ReferenceData.PathOf("sd", "lora", "kohya_locon.safetensors");

    static Dictionary<string, Tensor> Deltas(string file)
    {
        using var read = AdapterFile.Read(file);
        var d = new Dictionary<string, Tensor>(StringComparer.Ordinal);
        foreach (var m in read.Weights.Modules)
        {
            var up = m["lora_up"];
            var down = m["lora_down"];
            d[m.ModulePath] = up.reshape(up.shape[0], -1).matmul(down.reshape(down.shape[0], -1)).mul(AdapterScales.Scale(m));
        }
        return d;
    }

    [Fact]
    public void Resize_to_the_full_rank_is_lossless_and_carries_metadata_and_hashes()
    {
        using var tmp = new TempDir();
        var output = tmp.File("r4.safetensors");
        var report = LoraResizer.Resize(Locon, output, new ResizeOptions { Rank = 4 });
        Assert.All(report.Modules, m => Assert.Equal(4, m.NewRank));
        Assert.All(report.Modules, m => Assert.True(m.FroRetained > 1 - 1e-6));
        using var scope = NewDisposeScope();
        var before = Deltas(Locon);
        var after = Deltas(output);
        Assert.Equal(before.Keys.Order(), after.Keys.Order());
        foreach (var (k, v) in before)
            Assert.True(after[k].sub(v).abs().max().item<float>() < 1e-5 * Math.Max(1, v.abs().max().item<float>()), k);
        using var file = SafetensorsFile.Open(output);
        Assert.Equal("4", file.Metadata["ss_network_dim"]);
        Assert.Equal(AdapterHashes.DataSectionSha256(output), file.Metadata["sshs_model_hash"]);
        Assert.Equal(AdapterHashes.KohyaLegacyHash(output, file.Metadata), file.Metadata["sshs_legacy_hash"]);
        Assert.Contains("resized from 4 to 4", file.Metadata["ss_training_comment"]);
    }

    [Fact]
    public void Resize_to_a_lower_rank_keeps_the_top_singular_values_and_the_scale()
    {
        using var tmp = new TempDir();
        var output = tmp.File("r2.safetensors");
        LoraResizer.Resize(Locon, output, new ResizeOptions { Rank = 2 });
        using var scope = NewDisposeScope();
        var before = Deltas(Locon);
        var after = Deltas(output);
        foreach (var (k, v) in before)
        {
            var (_, s, _) = linalg.svd(v, fullMatrices: false);
            var (_, s2, _) = linalg.svd(after[k], fullMatrices: false);
            Assert.True(s2[..2].sub(s[..2]).abs().max().item<float>() < 1e-4 * Math.Max(1, s[0].item<float>()), k);
            Assert.True(s2[2..].abs().max().item<float>() < 1e-4 * Math.Max(1, s[0].item<float>()), k);
        }
        using var read = AdapterFile.Read(output);
        Assert.All(read.Weights.Modules, m => Assert.Equal(2, m["lora_down"].shape[0]));
    }

    [Fact]
    public void Factored_and_full_svd_resizes_give_the_same_delta()
    {
        using var read = AdapterFile.Read(Locon);
        using var scope = NewDisposeScope();
        foreach (var m in read.Weights.Modules.Take(40))
        {
            using var a = LoraResizer.ResizeModule(m, new ResizeOptions { Rank = 3 }, null, out var ra);
            using var b = LoraResizer.ResizeModule(m, new ResizeOptions { Rank = 3, FullSvd = true }, null, out var rb);
            Tensor D(ModuleAdapterWeights w) => w["lora_up"].reshape(w["lora_up"].shape[0], -1).matmul(w["lora_down"].reshape(3, -1)).mul(AdapterScales.Scale(w));
            Assert.True(D(a).sub(D(b)).abs().max().item<float>() < 1e-5, m.ModulePath);
            Assert.Equal(ra.FroRetained, rb.FroRetained, 4);
        }
    }

    [Fact]
    public void Dynamic_resize_follows_the_rule_and_writes_dynamic_metadata()
    {
        using var tmp = new TempDir();
        var output = tmp.File("dyn.safetensors");
        var report = LoraResizer.Resize(Locon, output, new ResizeOptions { Rank = 4, Dynamic = DynamicRankMethod.SvFro, DynamicValue = 0.9 });
        Assert.All(report.Modules, m => Assert.InRange(m.NewRank, 1, 4));
        Assert.All(report.Modules, m => Assert.True(m.FroRetained >= 0.9 - 1e-9 || m.NewRank == 4, $"{m.Module}: {m.FroRetained}"));
        using var file = SafetensorsFile.Open(output);
        Assert.Equal("Dynamic", file.Metadata["ss_network_dim"]);
        Assert.Equal("Dynamic", file.Metadata["ss_network_alpha"]);
    }

    [Fact]
    public void Rank_rules_match_kohya_including_the_plus_one_and_the_zero_matrix()
    {
        double[] s = [10, 5, 1, 0.1];
        // sv_ratio 4: values > 2.5 are 10, 5 → index 2, +1 → 3.
        Assert.Equal(3, LowRank.ChooseRank(s, 4, 8, DynamicRankMethod.SvRatio, 4));
        // sv_cumulative 0.9: cumulative 0.621, 0.932 → searchsorted 1, +1 → 2.
        Assert.Equal(2, LowRank.ChooseRank(s, 4, 8, DynamicRankMethod.SvCumulative, 0.9));
        // sv_fro 0.99: squared cumulative 0.7961, 0.9951 ≥ 0.9801 → index 1, +1 → 2.
        Assert.Equal(2, LowRank.ChooseRank(s, 4, 8, DynamicRankMethod.SvFro, 0.99));
        // index clamped to [1, L−1] before +1; the result capped at the requested rank.
        Assert.Equal(4, LowRank.ChooseRank(s, 4, 8, DynamicRankMethod.SvRatio, 1000));
        Assert.Equal(2, LowRank.ChooseRank(s, 4, 2, DynamicRankMethod.SvRatio, 1000));
        Assert.Equal(1, LowRank.ChooseRank([0, 0], 2, 8, DynamicRankMethod.SvFro, 0.5));
        Assert.Equal(8, LowRank.ChooseRank(s, 100, 8, DynamicRankMethod.None, 0));
    }

    [Fact]
    public void Loha_is_refused_with_a_clear_message()
    {
        using var tmp = new TempDir();
        var e = Assert.Throws<LoraSharpException>(() => LoraResizer.Resize(ReferenceData.PathOf("sd", "lora", "lycoris_loha.safetensors"), tmp.File("x.safetensors")));
        Assert.Contains("LoHa", e.Message);
        Assert.Contains("LoRA / LoCon only", e.Message);
    }

    [Fact]
    public void Peft_adapter_resizes_into_a_peft_folder()
    {
        using var tmp = new TempDir();
        var output = tmp.File("r4");
        LoraResizer.Resize(ReferenceData.PathOf("llm", "adapters", "rslora"), output, new ResizeOptions { Rank = 8 });
        using var before = AdapterFile.Read(ReferenceData.PathOf("llm", "adapters", "rslora"));
        using var after = AdapterFile.Read(output);
        Assert.NotNull(after.PeftConfig);
        using var scope = NewDisposeScope();
        foreach (var m in before.Weights.Modules)
        {
            var n = after.Weights.Modules.Single(x => x.ModulePath == m.ModulePath);
            var d0 = m["lora_up"].matmul(m["lora_down"]).mul(AdapterScales.Scale(m));
            var d1 = n["lora_up"].matmul(n["lora_down"]).mul(AdapterScales.Scale(n));
            Assert.True(d1.sub(d0).abs().max().item<float>() < 1e-5, m.ModulePath);
        }
    }
}
