using LoraSharp.Models.StableDiffusion;

namespace LoraSharp.Demo;

/// <summary>
/// The demo image model: Stable Diffusion 1.x's architecture (CLIP text encoder, UNet2DConditionModel, AutoencoderKL)
/// at a tiny size, chosen so that the configuration LoraSharp derives from a single file's shapes (SD1 conventions:
/// 8 attention heads per UNet level, 32 group-norm groups, text heads = width / 64, VAE scale 0.18215) is exactly
/// this one — the file loads like any SD 1.x checkpoint, in the trainer and the txt2img pipeline.
/// </summary>
public static class DemoModel
{
    /// <summary>Image side the demo model is trained for (latents 8×8).</summary>
    public const int ImageSize = 64;

    /// <summary>The configuration for a text vocabulary of <paramref name="vocabSize"/> tokens.</summary>
    public static StableDiffusionConfig Config(int vocabSize) => new()
    {
        Family = StableDiffusionFamily.SD1,
        TextEncoder = new ClipTextConfig
        {
            VocabSize = vocabSize,
            HiddenSize = 64,
            IntermediateSize = 256,
            NumHiddenLayers = 2,
            NumAttentionHeads = 1,
            MaxPositionEmbeddings = 77,
            HiddenAct = "quick_gelu",
        },
        Unet = new UNetConfig
        {
            InChannels = 4,
            OutChannels = 4,
            BlockOutChannels = [32, 64],
            DownBlockTypes = ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            UpBlockTypes = ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
            LayersPerBlock = [1, 1],
            TransformerLayersPerBlock = [1, 1],
            AttentionHeads = [8, 8],
            CrossAttentionDim = 64,
            NormNumGroups = 32,
            SampleSize = 64,
        },
        Vae = new VaeConfig
        {
            InChannels = 3,
            OutChannels = 3,
            LatentChannels = 4,
            BlockOutChannels = [32, 64, 64, 64],
            LayersPerBlock = 1,
            NormNumGroups = 32,
            ScalingFactor = 0.18215,
            SampleSize = ImageSize,
        },
    };

    /// <summary>A one-line description of a config (for logs and docs).</summary>
    public static string Describe(StableDiffusionModel model) =>
        $"SD1-architecture demo model: text encoder {StableDiffusionModel.ParameterCount(model.TextEncoder!) / 1e6:0.00}M, " +
        $"UNet {StableDiffusionModel.ParameterCount(model.Unet) / 1e6:0.00}M, VAE {StableDiffusionModel.ParameterCount(model.Vae!) / 1e6:0.00}M parameters";
}
