using LoraSharp.Adapters;
using LoraSharp.Models.StableDiffusion;
using LoraSharp.Training.Diffusion;
using TorchSharp;
using static TorchSharp.torch;

namespace LoraSharp.Tests.Training.Diffusion;

public class GradientCheckpointingTests
{
    internal static UNetConfig TinyUnet() => new()
    {
        BlockOutChannels = [16, 32],
        DownBlockTypes = ["CrossAttnDownBlock2D", "DownBlock2D"],
        UpBlockTypes = ["UpBlock2D", "CrossAttnUpBlock2D"],
        LayersPerBlock = [1, 1],
        TransformerLayersPerBlock = [1, 1],
        AttentionHeads = [2, 2],
        CrossAttentionDim = 24,
        NormNumGroups = 4,
    };

    static (Dictionary<string, float[]> Grads, float[] Output) Run(bool checkpoint, double dropout)
    {
        manual_seed(11);
        using var unet = new UNet2DConditionModel(TinyUnet());
        using var host = new AdapterHost(unet);
        host.FreezeBase();
        var cfg = new AdapterConfig { Rank = 4, Alpha = 4, ConvRank = 2, ConvAlpha = 1, Dropout = new AdapterDropout { Rank = dropout } };
        var a = host.Create("t", cfg, ModuleSelector.Regex(@"(down_blocks|up_blocks|mid_block)\..+"));
        // non-zero up weights so every adapter contributes
        using (no_grad()) foreach (var p in host.TrainableParameters()) p.normal_(0, 0.1);
        unet.train();
        using var gc = checkpoint ? GradientCheckpointing.Apply(unet) : null;
        if (checkpoint) Assert.True(gc!.Blocks > 4);
        manual_seed(5);
        var x = randn(2, 4, 8, 8);
        var ctx = randn(2, 7, 24).requires_grad_(true);
        var y = unet.Predict(x, tensor(new long[] { 10, 500 }), ctx);
        var loss = (y * y).mean();
        loss.backward();
        var missing = host.NamedTrainableParameters().Where(p => p.Param.grad is null).Select(p => p.Name).ToList();
        Assert.True(missing.Count == 0, $"checkpoint={checkpoint}: no gradient for {missing.Count}: {string.Join(", ", missing.Take(5))}");
        var grads = host.NamedTrainableParameters().ToDictionary(p => p.Name, p => p.Param.grad!.data<float>().ToArray());
        grads["context"] = ctx.grad!.data<float>().ToArray();
        return (grads, y.detach().data<float>().ToArray());
    }

    [Theory]
    [InlineData(0.0)]
    [InlineData(0.3)]
    public void Checkpointed_unet_gives_the_gradients_of_the_plain_graph(double rankDropout)
    {
        var plain = Run(false, rankDropout);
        var ckpt = Run(true, rankDropout);
        Assert.Equal(plain.Output, ckpt.Output);
        Assert.Equal(plain.Grads.Keys.OrderBy(k => k), ckpt.Grads.Keys.OrderBy(k => k));
        foreach (var (k, g) in plain.Grads)
        {
            var c = ckpt.Grads[k];
            Assert.True(g.Any(v => v != 0) || k.Contains("lora_down"), $"{k}: zero gradient");
            for (int i = 0; i < g.Length; i++)
                Assert.True(Math.Abs(g[i] - c[i]) <= 1e-5 + 1e-4 * Math.Abs(g[i]), $"{k}[{i}]: {g[i]} vs {c[i]}");
        }
    }
}
