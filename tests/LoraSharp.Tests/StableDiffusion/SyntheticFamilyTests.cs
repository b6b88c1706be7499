using LoraSharp.IO;
using LoraSharp.Models.StableDiffusion;
using LoraSharp.Tests.Infrastructure;
using TorchSharp;
using static TorchSharp.torch;

namespace LoraSharp.Tests.StableDiffusion;

/// <summary>
/// SD2 and SDXL-refiner layouts have no reference files: tiny models of those shapes are saved in their single-file
/// layout, detected, their configs derived from the shapes, reloaded, and must compute exactly what they computed before.
/// </summary>
public class SyntheticFamilyTests
{
    static readonly VaeConfig TinyVae = new() { BlockOutChannels = [8, 16], LayersPerBlock = 1, NormNumGroups = 4, ScalingFactor = 0.18215 };

    internal static StableDiffusionConfig Sd2() => new()
    {
        Family = StableDiffusionFamily.SD2,
        Unet = new UNetConfig
        {
            BlockOutChannels = [16, 32, 32],
            DownBlockTypes = ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
            UpBlockTypes = ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
            LayersPerBlock = [1, 1, 1],
            TransformerLayersPerBlock = [1, 1, 1],
            AttentionHeads = [2, 4, 4],
            CrossAttentionDim = 48,
            UseLinearProjection = true,
            NormNumGroups = 4,
        },
        Vae = TinyVae,
        TextEncoder = new ClipTextConfig { VocabSize = 100, HiddenSize = 48, IntermediateSize = 96, NumHiddenLayers = 2, NumAttentionHeads = 4, MaxPositionEmbeddings = 16, HiddenAct = "gelu" },
    };

    static StableDiffusionConfig Refiner() => new()
    {
        Family = StableDiffusionFamily.SDXLRefiner,
        Unet = new UNetConfig
        {
            BlockOutChannels = [16, 16, 32, 32],
            DownBlockTypes = ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
            UpBlockTypes = ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
            LayersPerBlock = [2, 2, 2, 2],
            TransformerLayersPerBlock = [1, 2, 2, 1],
            AttentionHeads = [2, 2, 4, 4],
            CrossAttentionDim = 48,
            UseLinearProjection = true,
            NormNumGroups = 4,
            AdditionEmbedType = "text_time",
            AdditionTimeEmbedDim = 8,
            ProjectionClassEmbeddingsInputDim = 40 + 5 * 8,
        },
        Vae = TinyVae with { ScalingFactor = 0.13025 },
        TextEncoder2 = new ClipTextConfig { VocabSize = 100, HiddenSize = 48, IntermediateSize = 96, NumHiddenLayers = 2, NumAttentionHeads = 4, MaxPositionEmbeddings = 16, HiddenAct = "gelu", ProjectionDim = 40 },
    };

    [Fact]
    public void Sd2_single_file_is_detected_derived_and_reloaded_exactly()
    {
        using var tmp = new TempDir();
        var config = Sd2();
        manual_seed(7);
        using var model = new StableDiffusionModel(config);
        var saved = tmp.File("sd2.safetensors");
        StableDiffusionCheckpoint.Save(model, saved);
        // Real SD2 files hold all 24 OpenCLIP layers and diffusers uses 23: add the unused last layer.
        var withExtraLayer = tmp.File("sd2_full.safetensors");
        using (var src = SafetensorsFile.Open(saved))
        {
            string last = $"{StableDiffusionCheckpoint.Sd2TextRoot}transformer.resblocks.{config.TextEncoder!.NumHiddenLayers - 1}.";
            string extra = $"{StableDiffusionCheckpoint.Sd2TextRoot}transformer.resblocks.{config.TextEncoder.NumHiddenLayers}.";
            SafetensorsWriter.Write(withExtraLayer, src.Keys.Select(k => new KeyValuePair<string, Tensor>(k, src.Load(k)))
                .Concat(src.Keys.Where(k => k.StartsWith(last, StringComparison.Ordinal)).Select(k => new KeyValuePair<string, Tensor>(extra + k[last.Length..], src.Load(k))))
                .Append(new(StableDiffusionCheckpoint.Sd2TextRoot + "text_projection", randn(48, 48)))
                .Append(new(StableDiffusionCheckpoint.Sd2TextRoot + "logit_scale", tensor(4.6f))));
        }

        using var source = StableDiffusionCheckpoint.Open(withExtraLayer);
        Assert.Equal(StableDiffusionFamily.SD2, StableDiffusionCheckpoint.DetectFamily(source));
        var derived = StableDiffusionCheckpoint.DeriveConfig(source);
        Assert.True(derived.Unet.UseLinearProjection);
        Assert.Equal(config.TextEncoder.NumHiddenLayers, derived.TextEncoder!.NumHiddenLayers);
        Assert.Equal("gelu", derived.TextEncoder.HiddenAct);
        Assert.Null(derived.TextEncoder.ProjectionDim);
        Assert.Equal(new[] { 1, 1, 1 }, derived.Unet.AttentionHeads); // SD2 convention: width / 64 (min 1)
        Assert.Equal(config.Unet.CrossAttentionDim, derived.Unet.CrossAttentionDim);

        using var loaded = StableDiffusionCheckpoint.Load(source, new StableDiffusionLoadOptions { Config = WithSmallDetails(derived, config) });
        var file = loaded.LoadReports.Single(r => r.Component == "file");
        Assert.Empty(file.Unexpected);
        Assert.Contains(file.Ignored, k => k.Contains($"resblocks.{config.TextEncoder.NumHiddenLayers}.", StringComparison.Ordinal));
        AssertSameOutputs(model, loaded);
    }

    [Fact]
    public void Sdxl_refiner_single_file_is_detected_derived_and_reloaded_exactly()
    {
        using var tmp = new TempDir();
        var config = Refiner();
        manual_seed(8);
        using var model = new StableDiffusionModel(config);
        var saved = tmp.File("refiner.safetensors");
        StableDiffusionCheckpoint.Save(model, saved);

        using var source = StableDiffusionCheckpoint.Open(saved);
        Assert.Contains(source.Keys, k => k.StartsWith(StableDiffusionCheckpoint.RefinerTextRoot + "transformer.resblocks.0.attn.in_proj_weight", StringComparison.Ordinal));
        Assert.Equal(StableDiffusionFamily.SDXLRefiner, StableDiffusionCheckpoint.DetectFamily(source));
        var derived = StableDiffusionCheckpoint.DeriveConfig(source);
        Assert.Null(derived.TextEncoder);
        Assert.Equal(40, derived.TextEncoder2!.ProjectionDim);
        Assert.Equal(8, derived.Unet.AdditionTimeEmbedDim); // (80 − 40 pooled) / 5 numbers
        Assert.Equal(config.Unet.DownBlockTypes, derived.Unet.DownBlockTypes);
        Assert.Equal(config.Unet.TransformerLayersPerBlock, derived.Unet.TransformerLayersPerBlock);
        Assert.Equal(0.13025, derived.Vae!.ScalingFactor);

        using var loaded = StableDiffusionCheckpoint.Load(source, new StableDiffusionLoadOptions { Config = WithSmallDetails(derived, config) });
        Assert.Empty(loaded.LoadReports.Single(r => r.Component == "file").Unexpected);
        AssertSameOutputs(model, loaded);
    }

    /// <summary>What shapes cannot tell (heads, group counts) taken from the original config.</summary>
    static StableDiffusionConfig WithSmallDetails(StableDiffusionConfig derived, StableDiffusionConfig original) => derived with
    {
        Unet = derived.Unet with { AttentionHeads = original.Unet.AttentionHeads, NormNumGroups = original.Unet.NormNumGroups },
        Vae = derived.Vae! with { NormNumGroups = original.Vae!.NormNumGroups },
        TextEncoder = derived.TextEncoder is null ? null : derived.TextEncoder with { NumAttentionHeads = original.TextEncoder!.NumAttentionHeads, VocabSize = original.TextEncoder.VocabSize },
        TextEncoder2 = derived.TextEncoder2 is null ? null : derived.TextEncoder2 with { NumAttentionHeads = original.TextEncoder2!.NumAttentionHeads },
    };

    static void AssertSameOutputs(StableDiffusionModel expected, StableDiffusionModel actual)
    {
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        manual_seed(3);
        var ids = randint(0, 99, [2, 16], dtype: ScalarType.Int64);
        var te = expected.TextEncoder ?? expected.TextEncoder2!;
        var te2 = actual.TextEncoder ?? actual.TextEncoder2!;
        using var a = te.call(ids);
        using var b = te2.call(ids);
        Assert.Equal(0, (a.LastHiddenState - b.LastHiddenState).abs().max().item<float>());
        if (a.TextEmbeds is not null) Assert.Equal(0, (a.TextEmbeds - b.TextEmbeds!).abs().max().item<float>());

        var latents = randn(2, 4, 8, 8);
        var t = tensor(new long[] { 3, 700 });
        Tensor? timeIds = expected.Config.Unet.AdditionEmbedType is null ? null : tensor(new float[] { 64, 64, 0, 0, 6, 64, 48, 8, 8, 2.5f }).reshape(2, 5);
        var eps1 = expected.Unet.Predict(latents, t, a.LastHiddenState, a.TextEmbeds, timeIds);
        var eps2 = actual.Unet.Predict(latents, t, b.LastHiddenState, b.TextEmbeds, timeIds);
        Assert.False(eps1.isnan().any().item<bool>(), "NaN in the original model's UNet output");
        Assert.False(eps2.isnan().any().item<bool>(), "NaN in the reloaded model's UNet output");
        Assert.Equal(0, (eps1 - eps2).abs().max().item<float>());

        var image1 = expected.Vae!.Decode(latents);
        var image2 = actual.Vae!.Decode(latents);
        Assert.Equal(0, (image1 - image2).abs().max().item<float>());
    }
}
