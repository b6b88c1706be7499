using LoraSharp.Formats;
using LoraSharp.IO;
using LoraSharp.Tests.Infrastructure;
using TorchSharp;
using static TorchSharp.torch;

namespace LoraSharp.Tests.Formats;

/// <summary>Bad adapter files get an error naming the file, the key and the problem.</summary>
public class AdapterFileErrorTests
{
    static readonly ModuleIndex Index = ModuleIndex.FromShapes([
        new("unet.down_blocks.0.attentions.0.proj_in", [16, 16]),
        new("unet.down_blocks.0.attentions.0.proj_out", [16, 16]),
    ]);

    static LoraSharpException ReadError(TempDir tmp, Dictionary<string, Tensor> tensors, ModuleIndex? index = null, bool lenient = false)
    {
        var path = tmp.File("bad.safetensors");
        SafetensorsWriter.Write(path, tensors);
        var e = Assert.Throws<LoraSharpException>(() => AdapterFile.Read(path, index ?? Index, new AdapterReadOptions { Lenient = lenient }).Dispose());
        Assert.Equal(path, e.FilePath);
        return e;
    }

    [Fact]
    public void An_up_without_its_down_is_named()
    {
        using var tmp = new TempDir();
        var e = ReadError(tmp, new() { ["lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight"] = zeros(16, 4) });
        Assert.Contains("lora_down", e.Message);
        Assert.Equal("lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight", e.Key);
    }

    [Fact]
    public void A_rank_mismatch_between_up_and_down_is_named()
    {
        using var tmp = new TempDir();
        var e = ReadError(tmp, new()
        {
            ["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"] = zeros(4, 16),
            ["lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight"] = zeros(16, 8),
        });
        Assert.Contains("rank mismatch", e.Message);
    }

    [Fact]
    public void An_alpha_that_is_not_a_scalar_is_named()
    {
        using var tmp = new TempDir();
        var e = ReadError(tmp, new()
        {
            ["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"] = zeros(4, 16),
            ["lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight"] = zeros(16, 4),
            ["lora_unet_down_blocks_0_attentions_0_proj_in.alpha"] = zeros(2),
        });
        Assert.Equal("lora_unet_down_blocks_0_attentions_0_proj_in.alpha", e.Key);
        Assert.Contains("scalar", e.Message);
    }

    [Fact]
    public void Unknown_suffixes_and_modules_are_an_error_by_default_and_a_report_when_lenient()
    {
        using var tmp = new TempDir();
        var tensors = new Dictionary<string, Tensor>
        {
            ["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"] = zeros(4, 16),
            ["lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight"] = zeros(16, 4),
            ["lora_unet_down_blocks_0_attentions_0_proj_in.lora_sideways.weight"] = zeros(4),
            ["lora_unet_up_blocks_3_attentions_2_proj_out.lora_down.weight"] = zeros(4, 16),
        };
        var e = ReadError(tmp, tensors);
        Assert.Contains("2 of 4 keys match no module", e.Message);
        Assert.Contains("lora_unet_up_blocks_N_attentions_N_proj_out.lora_down.weight", e.Message);

        using var result = AdapterFile.Read(tmp.File("bad.safetensors"), Index, new AdapterReadOptions { Lenient = true });
        Assert.Equal(2, result.Coverage.UnmatchedCount);
        Assert.Single(result.Weights.Modules);
        Assert.Contains(result.Coverage.UntouchedModules, g => g.Example == "unet.down_blocks.0.attentions.0.proj_out");
    }

    [Fact]
    public void A_lora_for_another_base_is_refused_naming_both_bases()
    {
        // An SDXL-shaped LoRA (cross-attention width 2048) on an SD1-shaped model (768).
        var sd1 = ModuleIndex.FromShapes([new("unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k", [640, 768])]);
        using var tmp = new TempDir();
        var e = ReadError(tmp, new()
        {
            ["lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight"] = zeros(4, 2048),
            ["lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight"] = zeros(640, 4),
        }, sd1);
        Assert.Contains("made for SDXL", e.Message);
        Assert.Contains("the model is SD1.x", e.Message);
    }

    [Fact]
    public void A_peft_folder_without_weights_is_named()
    {
        using var tmp = new TempDir();
        File.WriteAllText(tmp.File("adapter_config.json"), "{\"peft_type\":\"LORA\",\"r\":8,\"lora_alpha\":16}");
        var e = Assert.Throws<LoraSharpException>(() => AdapterFile.Read(tmp.Path).Dispose());
        Assert.Contains("adapter_model.safetensors", e.Message);
    }
}
