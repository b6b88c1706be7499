using LoraSharp.Adapters;
using LoraSharp.Formats;
using LoraSharp.IO;
using LoraSharp.Tests.Infrastructure;
using LoraSharp.Tools;
using TorchSharp;
using static TorchSharp.torch;

namespace LoraSharp.Tests.Tools;

/// <summary>extract recovers a known low-rank difference; randomized and full SVD agree; TE skipped below min-diff.</summary>
public class ExtractTests
{
    static string SingleFile => ReferenceData.PathOf("sd", "model", "tiny_sd15.safetensors");

    static Dictionary<string, Tensor> Deltas(string adapter, ModuleIndex index)
    {
        using var read = AdapterFile.Read(adapter, index);
        var result = new Dictionary<string, Tensor>(StringComparer.Ordinal);
        foreach (var m in read.Weights.Modules)
        {
            using var a = AdapterFactory.FromWeights(m, LoraMerger.Geometry(index.WeightShape(m.ModulePath)), ScalarType.Float32, CPU);
            result[m.ModulePath] = a.DeltaWeight().detach().clone();
        }
        return result;
    }

    [Fact]
    public void Extract_of_base_plus_a_locon_recovers_its_delta_for_every_module()
    {
        using var tmp = new TempDir();
        var locon = ReferenceData.PathOf("sd", "lora", "kohya_locon.safetensors");
        var tuned = tmp.File("tuned.safetensors");
        LoraMerger.MergeIntoModel(SingleFile, [new LoraInput(locon, 1.0)], tuned);
        var output = tmp.File("extracted.safetensors");
        var report = LoraExtractor.Extract(SingleFile, tuned, output, new ExtractOptions { Rank = 4, ConvRank = 4, ClampQuantile = 1.0 });
        Assert.False(report.TextEncoderSkipped);
        Assert.All(report.Modules, m => Assert.True(m.EnergyRetained > 1 - 1e-6, $"{m.Module}: {m.EnergyRetained}"));

        using var model = ModelCheckpoint.Open(SingleFile);
        using var scope = NewDisposeScope();
        var expected = Deltas(locon, model.Index);
        var ours = Deltas(output, model.Index);
        Assert.Equal(expected.Keys.Order(), ours.Keys.Order()); // the same 289 modules kohya's LoRA network targets with conv_dim
        foreach (var (path, e) in expected)
        {
            double diff = ours[path].sub(e).abs().max().item<float>();
            Assert.True(diff < 2e-5, $"{path}: max |ΔW − ΔW_locon| = {diff:G3}");
        }
        using var file = SafetensorsFile.Open(output);
        Assert.Equal("4", file.Metadata["ss_network_dim"]);
        Assert.Equal("4.0", file.Metadata["ss_network_alpha"]);
        Assert.Equal(AdapterHashes.DataSectionSha256(output), file.Metadata["sshs_model_hash"]);
        Assert.Contains("conv_dim", file.Metadata["ss_network_args"]);
        // alpha = rank: every module's scale is 1.
        Assert.All(file.Keys.Where(k => k.EndsWith(".alpha", StringComparison.Ordinal)), k => Assert.Equal(4f, file.Load(k).item<float>()));
    }

    [Fact]
    public void Without_conv_rank_only_transformer_and_text_encoder_modules_are_extracted_like_kohya_lora()
    {
        using var tmp = new TempDir();
        var lora = ReferenceData.PathOf("sd", "lora", "kohya_lora.safetensors");
        var tuned = tmp.File("tuned.safetensors");
        LoraMerger.MergeIntoModel(SingleFile, [new LoraInput(lora, 1.0)], tuned);
        var report = LoraExtractor.Extract(SingleFile, tuned, tmp.File("e.safetensors"), new ExtractOptions { Rank = 4 });
        using var read = AdapterFile.Read(lora);
        Assert.Equal(read.Weights.Modules.Count, report.Modules.Count);
    }

    [Fact]
    public void Text_encoder_is_skipped_when_it_did_not_change()
    {
        using var tmp = new TempDir();
        var unetOnly = ReferenceData.PathOf("sd", "lora", "diffusers_lora.safetensors");
        var tuned = tmp.File("tuned.safetensors");
        LoraMerger.MergeIntoModel(SingleFile, [new LoraInput(unetOnly, 1.0)], tuned);
        var report = LoraExtractor.Extract(SingleFile, tuned, tmp.File("e.safetensors"), new ExtractOptions { Rank = 2 });
        Assert.True(report.TextEncoderSkipped);
        Assert.Equal(0, report.TextEncoderMaxDiff);
        Assert.DoesNotContain(report.Modules, m => m.Module.StartsWith("text_encoder", StringComparison.Ordinal));
    }

    [Fact]
    public void Llm_extract_writes_a_peft_folder_that_recovers_the_adapter_delta()
    {
        using var tmp = new TempDir();
        var model = ReferenceData.PathOf("llm", "model");
        var adapter = ReferenceData.PathOf("llm", "adapters", "lora");
        var tuned = tmp.File("tuned");
        LoraMerger.MergeIntoModel(model, [new LoraInput(adapter, 1.0)], tuned);
        var output = tmp.File("extracted");
        var report = LoraExtractor.Extract(model, tuned, output, new ExtractOptions { Rank = 8, ClampQuantile = 1.0 });
        Assert.Equal(14, report.Modules.Count); // 7 projections × 2 layers; no lm_head, no embeddings
        using var ckpt = ModelCheckpoint.Open(model);
        using var scope = NewDisposeScope();
        var expected = Deltas(adapter, ckpt.Index);
        var ours = Deltas(output, ckpt.Index);
        foreach (var (path, e) in expected)
            Assert.True(ours[path].sub(e).abs().max().item<float>() < 1e-5, path);
        Assert.NotNull(AdapterFile.Read(output).PeftConfig);
    }

    [Fact]
    public void Randomized_and_full_svd_agree_on_a_low_rank_plus_noise_matrix_and_auto_picks_each_where_it_should()
    {
        using var scope = NewDisposeScope();
        manual_seed(5);
        var low = randn(600, 12).matmul(randn(12, 500)).add(randn(600, 500).mul(1e-4));
        using var full = LowRank.Svd(low, 8, SvdMethod.Full);
        using var fast = LowRank.Svd(low, 8, SvdMethod.Randomized, seed: 1);
        using var auto = LowRank.Svd(low, 8, SvdMethod.Auto, seed: 1);
        Assert.Equal(SvdMethod.Randomized, auto.Method);
        Assert.True(fast.S.sub(full.S).abs().max().item<float>() < 1e-4 * full.S[0].item<float>());
        var a = full.U.mul(full.S).matmul(full.Vh);
        var b = fast.U.mul(fast.S).matmul(fast.Vh);
        Assert.True(a.sub(b).abs().max().item<float>() < 1e-4 * a.abs().max().item<float>());

        // A flat spectrum: the sketch cannot guarantee the top-8 subspace, so Auto falls back to the full SVD.
        var flat = randn(600, 500);
        using var fallback = LowRank.Svd(flat, 8, SvdMethod.Auto);
        Assert.Equal(SvdMethod.Full, fallback.Method);
        // Small matrices always use the full SVD.
        using var small = LowRank.Svd(randn(64, 48), 4, SvdMethod.Auto);
        Assert.Equal(SvdMethod.Full, small.Method);
    }

    [Fact]
    public void Factored_svd_equals_the_svd_of_the_product()
    {
        using var scope = NewDisposeScope();
        manual_seed(6);
        var up = randn(40, 6);
        var down = randn(6, 30);
        var (u, s, vh) = LowRank.FactoredSvd(up, down);
        var (_, sFull, _) = linalg.svd(up.matmul(down), fullMatrices: false);
        Assert.True(s.sub(sFull[..6]).abs().max().item<float>() < 1e-4);
        Assert.True(u.mul(s).matmul(vh).sub(up.matmul(down)).abs().max().item<float>() < 1e-4);
    }

    [Fact]
    public void Quantile_matches_torch_linear_interpolation_and_clamps_both_factors()
    {
        using var scope = NewDisposeScope();
        var v = tensor(new float[] { 4, 1, 3, 2 });
        Assert.Equal(3.25, LowRank.Quantile(v, 0.75), 12); // sorted 1 2 3 4, position 2.25
        var up = tensor(new float[] { -10, 1, 2 });
        var down = tensor(new float[] { 3, 0.5f });
        double hi = LowRank.ClampQuantile(up, down, 0.5);
        Assert.Equal(1.0, hi, 6);
        Assert.Equal(-1f, up[0].item<float>());
        Assert.Equal(1f, down[0].item<float>());
    }
}
